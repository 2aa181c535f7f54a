"""Routing and jobs: stable series, rules, exactly one job, Celery (file system and Redis)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.dicom_factory import multiframe_sc, with_new_uids
from tests.peers import HIGHDICOM_FILES, RedisProcess, free_port, require_tool

WSI = HIGHDICOM_FILES / "sm_image.dcm"


def storescu(port: int, *files: Path) -> None:
    tool = require_tool("storescu")
    subprocess.run([tool, "-R", "-xy", "-aec", "CYTONODE", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.slow  # a node analyses a whole slide
def test_series_over_two_associations_makes_exactly_one_job(start_node, tmp_path: Path) -> None:
    stable_age_s = 8.0  # long enough to send the rest of the series before it counts as stable
    node = start_node(workers=1, stable_age_s=stable_age_s)
    series, study = generate_uid(), generate_uid()
    first = with_new_uids(WSI, tmp_path / "a.dcm", series_uid=series, study_uid=study)
    second = with_new_uids(WSI, tmp_path / "b.dcm", series_uid=series, study_uid=study)
    other = multiframe_sc(tmp_path / "sc.dcm", 1)  # not SM: no rule matches
    sent = time.monotonic()
    storescu(node.port, first)
    status = node.status()
    assert time.monotonic() - sent < stable_age_s / 2, "too slow to observe the unstable series"
    # Younger than the stable age: stored, not routed yet.
    assert status["jobs"] == [] and status["series"][0]["routing"] == "receiving"
    storescu(node.port, second, other)
    status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "done",
                           timeout=240, what="the job to finish")
    assert len(status["jobs"]) == 1
    job = status["jobs"][0]
    assert job["series_instance_uid"] == series
    ds = dcmread(WSI, stop_before_pixels=True)
    assert job["result"]["instances"] == 2
    assert job["result"]["frames"] == 2 * int(ds.NumberOfFrames)
    assert job["result"]["width"] == int(ds.TotalPixelMatrixColumns)
    assert job["result"]["height"] == int(ds.TotalPixelMatrixRows)
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert abs(job["result"]["pixel_spacing_um"][0] - float(spacing[1]) * 1000) < 1e-6
    routing = {s["series_instance_uid"]: s["routing"] for s in status["series"]}
    assert routing[series] == "job"
    assert routing[str(dcmread(other).SeriesInstanceUID)] == "ignored"
    # A resend after the job does not start a second one.
    storescu(node.port, first)
    time.sleep(2)
    assert len(node.status()["jobs"]) == 1


def test_routing_rules_from_settings(start_node, tmp_path: Path) -> None:
    # A rule that selects nothing we send: the WSI series is ignored, no job.
    node = start_node(workers=0, routing_rules='[{"modality": "SM", "image_type": "LABEL"}]')
    storescu(node.port, with_new_uids(WSI, tmp_path / "a.dcm"))
    status = node.wait_for(lambda s: s["series"] and s["series"][0]["routing"] != "receiving",
                           what="routing")
    assert status["series"][0]["routing"] == "ignored"
    assert status["jobs"] == []


@pytest.mark.slow  # a node analyses a whole slide
def test_redis_broker_runs_the_same_job(start_node, tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis").start()
    try:
        node = start_node(workers=1, broker_url=f"redis://127.0.0.1:{redis.port}/0")
        storescu(node.port, with_new_uids(WSI, tmp_path / "a.dcm"))
        status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "done",
                               timeout=240, what="the job over Redis")
        assert status["jobs"][0]["result"]["levels"][0]["width"] > 0
    finally:
        redis.stop()


@pytest.mark.slow  # a node analyses a whole slide
def test_postgresql_index_works_the_same(start_node, tmp_path: Path) -> None:
    from tests.peers import PostgresProcess

    pg_dir = Path("/tmp") / f"cytonode-pg-{tmp_path.name}"  # readable by the postgres user
    pg = PostgresProcess(pg_dir).start()
    try:
        node = start_node(workers=1, database_url=pg.url)
        storescu(node.port, with_new_uids(WSI, tmp_path / "a.dcm"))
        status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "done",
                               timeout=240, what="the job with a PostgreSQL index")
        assert status["series"][0]["instances"] == 1
        assert not (node.data_dir / "index.sqlite").exists()
    finally:
        pg.stop()
        import shutil

        shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.mark.slow  # a node analyses a whole slide
def test_sample_slide_is_analysed_and_results_reach_orthanc(start_node, tmp_path: Path) -> None:
    """Orthanc, the PACS, routes the slide to the node by C-STORE; the job finds and classifies the
    cells; the SR, the bulk annotations and the heatmap SEG go by the outbox back into Orthanc,
    which serves them on DICOMweb."""
    import requests

    from dicom_node.app.demo import SAMPLE_SLIDE
    from tests.peers import OrthancProcess

    files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
    assert len(files) >= 2, "the sample slide is a pyramid of several instances"
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", {"CYTONODE": ("CYTONODE", node_port)}).start()
    try:
        node = start_node(workers=1, destinations=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                          outbox_retry_initial_s=0.5, dicom_port=node_port)
        series = {orthanc.upload(f)["ParentSeries"] for f in files}
        assert len(series) == 1
        rsp = requests.post(f"{orthanc.url}/modalities/cytonode/store",
                            json={"Resources": list(series), "Synchronous": True}, timeout=300)
        assert rsp.ok, rsp.text
        status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] in ("done", "failed"),
                               timeout=300, what="the sample slide's job")
        job = status["jobs"][0]
        assert job["state"] == "done", job["error"]
        base = max((dcmread(f, stop_before_pixels=True) for f in files),
                   key=lambda d: int(d.TotalPixelMatrixColumns))
        assert len(job["result"]["levels"]) == len(files)
        assert (job["result"]["width"], job["result"]["height"]) == (
            int(base.TotalPixelMatrixColumns), int(base.TotalPixelMatrixRows))
        assert job["result"]["frames"] == sum(
            int(dcmread(f, stop_before_pixels=True).NumberOfFrames) for f in files)
        sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        for stored in (node.data_dir / "store").rglob("*.dcm"):
            if stored.stem in sent:  # JPEG baseline, as sent: never transcoded
                assert str(dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) \
                    == "1.2.840.10008.1.2.4.50"
        # The job found the white cells and made its report, annotations and heatmaps ...
        assert job["result"]["cell_count"] > 0
        assert sum(row["count"] for row in job["result"]["differential"]) == job["result"]["cell_count"]
        objects = job["result"]["objects"]
        # ... and, for any PACS viewer, a PDF report and a gallery of the flagged cells ...
        assert set(objects) == {"sr", "ann", "seg", "pdf", "sc"}
        # ... which the outbox delivered to the PACS, in the slide's study.
        node.wait_for(lambda s: s["outbox"]["sent"] == 5, timeout=120, what="delivery to Orthanc")
        classes = {"sr": "1.2.840.10008.5.1.4.1.1.88.34", "ann": "1.2.840.10008.5.1.4.1.1.91.1",
                   "seg": "1.2.840.10008.5.1.4.1.1.66.4", "pdf": "1.2.840.10008.5.1.4.1.1.104.1",
                   "sc": "1.2.840.10008.5.1.4.1.1.7"}
        for kind, uid in objects.items():
            found = orthanc.find_instance(uid)
            assert len(found) == 1, f"{kind} not in Orthanc"
            tags = requests.get(f"{orthanc.url}/instances/{found[0]}/simplified-tags", timeout=30).json()
            assert tags["SOPClassUID"] == classes[kind]
            assert tags["StudyInstanceUID"] == str(base.StudyInstanceUID)
        rsp = requests.get(f"{orthanc.url}/dicom-web/studies/{base.StudyInstanceUID}/series", timeout=30)
        assert rsp.ok
        modalities = {s["00080060"]["Value"][0] for s in rsp.json()}
        assert {"SR", "ANN", "SEG", "DOC", "OT"} <= modalities
    finally:
        orthanc.stop()
