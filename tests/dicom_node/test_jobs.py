"""Analysis jobs at their edges, through a real node: a slide that cannot be decoded, a slide without
white cells, and the ``final-only`` release policy. Results go to a stand-in PACS (a pynetdicom SCP)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from analysis.classes import CLASS_NAMES
from analysis.training.site_readable import other_stain
from dicom_node.app.demo import SAMPLE_SLIDE, StandInPACS
from dicom_node.jobs.result import JobResult, read_summary
from tests.peers import CYTONODE, echo, require_tool


def storescu(port: int, *files: Path) -> None:
    tool = require_tool("storescu")
    subprocess.run([tool, "-R", "-xy", "-aec", "CYTONODE", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture
def pacs(tmp_path: Path):
    folder = tmp_path / "pacs"
    folder.mkdir()
    scp = StandInPACS(folder)
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A real slide (built by ``cytonode make-slide``) of one blank, glass-coloured field."""
    tmp = tmp_path_factory.mktemp("blank")
    rng = np.random.default_rng(0)
    field = np.full((480, 640, 3), (235, 215, 215), np.uint8) + rng.integers(0, 8, (480, 640, 3),
                                                                              dtype=np.uint8)
    Image.fromarray(field).save(tmp / "blank.png")
    made = subprocess.run([CYTONODE, "make-slide", str(tmp / "blank.png"), "--out", str(tmp / "slide")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    return sorted((tmp / "slide").glob("*.dcm"))


def _wait_job(node, timeout: float = 300) -> dict:
    status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] in ("done", "failed"),
                           timeout=timeout, what="the job")
    return status["jobs"][0]


def test_unreadable_slide_fails_its_job_and_sends_nothing(start_node, pacs: StandInPACS,
                                                          tmp_path: Path) -> None:
    # The sample slide with every JPEG frame replaced by bytes of the same length that are not JPEG:
    # the instances are well-formed DICOM (the SCP accepts them), their pixels cannot be decoded.
    study, series = generate_uid(), generate_uid()
    broken = []
    for path in sorted(SAMPLE_SLIDE.glob("*.dcm")):
        ds = dcmread(path)
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(len(f) - 4) + b"\xff\xd9" for f in frames])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        broken.append(tmp_path / path.name)
        ds.save_as(broken[-1], enforce_file_format=True)
    node = start_node(workers=1, destinations=f"DEMOPACS@127.0.0.1:{pacs.port}",
                      outbox_retry_initial_s=0.5)
    storescu(node.port, *broken)
    job = _wait_job(node)
    assert job["state"] == "failed"
    assert job["error"], "a failed job records its reason"
    assert "SlideUnreadableError" in job["error"] and "cannot be decoded" in job["error"]
    time.sleep(2)  # an outbox pass would have run by now
    status = node.status()
    assert status["outbox"]["pending"] == 0 and status["outbox"]["sent"] == 0
    assert pacs.received == []
    assert echo(node.port), "the node keeps answering after a failed job"
    assert not list((node.data_dir / "results").glob("*/summary.json"))


@pytest.mark.slow  # a node analyses a whole slide
def test_slide_without_white_cells_sends_a_report_that_says_so(start_node, pacs: StandInPACS,
                                                              blank_slide: list[Path]) -> None:
    # the settings' encoder section reaches the objects the worker writes
    node = start_node(workers=1, destinations=f"DEMOPACS@127.0.0.1:{pacs.port}",
                      outbox_retry_initial_s=0.5, institution_name="Haematology Lab 2",
                      sr_series_number=950)
    storescu(node.port, *blank_slide)
    job = _wait_job(node)
    assert job["state"] == "done", job["error"]
    assert job["result"]["cell_count"] == 0
    # no annotations, heatmaps or gallery of nothing: the SR and the PDF report that say so
    assert set(job["result"]["objects"]) == {"sr", "pdf"}
    # the hand-over: the job row (read by `status` through JobResult) and summary.json are both
    # versioned documents that parse, and they agree
    assert job["result"]["schema"] == "cytonode.job-result/1"
    result = JobResult.from_dict(job["result"])
    summary = read_summary(Path(result.results_dir))
    assert summary.as_dict()["schema"] == "cytonode.slide-summary/1"
    assert summary.cell_count == result.cell_count == 0
    assert {f["sop_instance_uid"] for f in summary.files.values()} == set(result.objects.values())
    assert summary.slide["series_instance_uid"] == job["series_instance_uid"]
    assert (result.width, result.height) == tuple(summary.slide["total_pixel_matrix"])
    assert result.instances == len(blank_slide) and result.frames > 0
    assert {"read", "detect", "encode"} <= set(result.timings_s) and result.timings_s["read"] > 0
    node.wait_for(lambda s: s["outbox"]["sent"] == 2, timeout=60, what="the reports' delivery")
    assert sorted(m for m, _ in pacs.received) == ["DOC", "SR"]
    sr_uid = next(uid for m, uid in pacs.received if m == "SR")
    sr = hd.sr.srread(pacs.folder / f"{sr_uid}.dcm")
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert (sr.InstitutionName, sr.SeriesNumber) == ("Haematology Lab 2", 950)
    total = sr.content.get_image_measurement_groups()[0].get_measurements()
    assert total[0].value == 0


@pytest.mark.slow  # a node analyses a whole slide
def test_final_only_policy_holds_results_until_sign_off(start_node, pacs: StandInPACS,
                                                        blank_slide: list[Path]) -> None:
    node = start_node(workers=1, destinations=f"DEMOPACS@127.0.0.1:{pacs.port}",
                      outbox_retry_initial_s=0.5, release_policy="final-only")
    storescu(node.port, *blank_slide)
    job = _wait_job(node)
    assert job["state"] == "done", job["error"]
    sr_uid = job["result"]["objects"]["sr"]
    assert list((node.data_dir / "store").rglob(f"{sr_uid}.dcm")), "the report is stored"
    time.sleep(3)  # several outbox passes
    status = node.status()
    assert status["outbox"]["pending"] == 0 and status["outbox"]["sent"] == 0
    assert pacs.received == []


AML_NEUTROPHILS = Path(__file__).resolve().parents[3] / "shared" / "data" / "aml_dev" / "neutrophil_segmented_NGS"


@pytest.mark.skipif(not AML_NEUTROPHILS.is_dir(), reason="aml_dev not present")
@pytest.mark.slow  # a node analyses a whole slide
def test_jobs_use_and_name_the_sites_calibration(start_node, pacs: StandInPACS, tmp_path: Path,
                                                 blank_slide: list[Path]) -> None:
    """`cytonode calibrate-site` writes into the node's data folder; the next job uses the
    newest calibration and says which, in `status --json` and in the SR's parameters."""
    import json

    cells = tmp_path / "site-cells"
    cells.mkdir()
    for p in sorted(AML_NEUTROPHILS.glob("*.jpg"))[:32]:
        (cells / p.name).symlink_to(p)
    made = subprocess.run([CYTONODE, "calibrate-site", str(cells), "--id", "lab-2",
                           "--data-dir", str(tmp_path / "node"), "--json"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    label = f"lab-2 ({json.loads(made.stdout)['label'].split('(')[1]}"
    # the settings' encoder section reaches the objects the worker writes
    node = start_node(workers=1, destinations=f"DEMOPACS@127.0.0.1:{pacs.port}",
                      outbox_retry_initial_s=0.5, institution_name="Haematology Lab 2",
                      sr_series_number=950)
    storescu(node.port, *blank_slide)
    job = _wait_job(node)
    assert job["state"] == "done", job["error"]
    assert job["result"]["site_calibration"] == label
    assert job["result"]["validated_domain"] == "inside the validated domain"
    node.wait_for(lambda s: s["outbox"]["sent"] == 2, timeout=60, what="the reports' delivery")
    sr_uid = next(uid for m, uid in pacs.received if m == "SR")
    sr = dcmread(pacs.folder / f"{sr_uid}.dcm")
    texts = [str(el.value) for el in sr.iterall() if el.keyword == "TextValue"]
    assert f"site_calibration={label}" in texts  # TID 4019 Algorithm Parameters
    # both models read the site's 32 cells at its calibration: how many were unsure is named
    unsure = json.loads(made.stdout)["unsure"]
    assert unsure["measured"] == 32 and unsure["too_many"] is None, unsure
    assert (f"site_unsure={unsure['text']} of the site's unlabelled cells read at its calibration "
            f"(validated labs: at most {unsure['expected']:.1%})") in texts


CHULA = AML_NEUTROPHILS.parents[1] / "chula_wbc"


@pytest.mark.skipif(not CHULA.is_dir(), reason="Chula cells not present")
@pytest.mark.slow  # a node analyses a whole slide
def test_a_job_names_the_sites_own_network(start_node, tmp_path: Path,
                                           blank_slide: list[Path]) -> None:
    """A calibration with labelled cells of a stain the shipped network has never seen (Chula's
    cells in a dark, bluish stain) stores the site's own network and how well the node reads
    the named cells; the next job uses it and its report names it, with its digest, and says
    when the site is read below the accuracy the node is validated for."""
    import json

    from analysis.framing import FIELD_OF_VIEW_UM
    from analysis.training.labs import load_lab

    train = load_lab(CHULA.parent, "chula", "train", 96, FIELD_OF_VIEW_UM).per_class(12, seed=0)
    named, cells = tmp_path / "named", tmp_path / "cells"
    for i, (image, label) in enumerate(zip(other_stain(train.images), train.labels)):
        folder = named / CLASS_NAMES[label] if i % 2 == 0 else cells
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    made = subprocess.run([CYTONODE, "calibrate-site", str(cells), "--labelled", str(named),
                           "--id", "lab-4", "--pixel-spacing", str(FIELD_OF_VIEW_UM / 96),
                           "--data-dir", str(tmp_path / "node"), "--json", "--no-finetune"],
                          check=False, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    summary = json.loads(made.stdout)
    assert summary["site_network"]["used"], summary["site_network"]
    verified = summary["verified"]
    low, high = verified["interval_95"]
    assert verified["cells"] == 30 and low <= verified["balanced_accuracy"] <= high, verified
    from dicom_node.app.web import make_web_app
    from dicom_node.settings import Settings
    from tests.viewer.conftest import PASSWORD, login

    stored = tmp_path / "node" / "sites" / "lab-4.json"
    raw = json.loads(stored.read_text())

    # both models read the site's 30 unnamed cells; the stain makes many of them unsure
    assert raw["unsure_measured"] == 30 and raw["unsure_expected"] > 0, raw

    def read_at(accuracy: float, interval: list[float], unsure: int) -> None:
        """The site as if its named cells had been read at ``accuracy`` and ``unsure`` of its 30
        unnamed ones had been unsure."""
        stored.write_text(json.dumps({**raw, "verified_balanced_accuracy": accuracy,
                                      "verified_interval": interval, "unsure_cells": unsure}))

    # A site read at 95 %: inside, and the pathologist's case page says how well it was read.
    read_at(0.95, [0.9, 0.98], unsure=6)
    node = start_node(workers=1)
    subprocess.run([CYTONODE, "user", "add", "path", "--role", "pathologist", "--password-stdin"],
                   input=PASSWORD + "\n", env=dict(node.env), check=True, capture_output=True,
                   text=True, timeout=120)
    client = make_web_app(Settings(data_dir=node.data_dir)).test_client()
    login(client, "path")
    storescu(node.port, *blank_slide)
    job = _wait_job(node)
    assert job["state"] == "done", job["error"]
    assert job["result"]["validated_domain"] == "inside the validated domain"
    page = client.get(f"/cases/{job['series_instance_uid']}").get_data(as_text=True)
    assert ('<span id="site-verified">reported class right on 95.0% (balanced; 95% interval '
            "90.0%-98.0%) of the site&#39;s 30 labelled cells, none read by a network fitted on "
            "it</span>") in page and "domain-alert" not in page
    # The same site had its named cells read at 60 % and 24 of its 30 other cells unsure: below
    # what the node is validated for, so its slides are outside the validated domain (every cell
    # to review) and the report says why, both ways.
    read_at(0.6, [0.45, 0.74], unsure=24)
    listing = subprocess.run([CYTONODE, "calibrate-site", "--list", "--data-dir", str(tmp_path / "node")],
                             check=False, capture_output=True, text=True, timeout=120)
    assert ("warning: site lab-4's 30 labelled cells are read right at 60.0% (balanced; 95% "
            "interval 45.0%-74.0%)") in listing.stdout
    assert "\tlabelled cells read right: 60.0% (balanced; 95% interval 45.0%-74.0%)" in listing.stdout
    second = subprocess.run([CYTONODE, "make-slide", str(blank_slide[0].parents[1] / "blank.png"),
                             "--out", str(tmp_path / "second")],
                            check=False, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    storescu(node.port, *sorted((tmp_path / "second").glob("*.dcm")))
    status = node.wait_for(lambda s: len(s["jobs"]) == 2 and s["jobs"][1]["state"] in ("done", "failed"),
                           timeout=300, what="the second job")
    job = status["jobs"][1]
    assert job["state"] == "done", job["error"]
    assert job["result"]["site_calibration"] == summary["label"] and "labelled)" in summary["label"]
    from analysis.site import load_site

    unsure_why = load_site(tmp_path / "node", "lab-4").too_many_unsure
    assert unsure_why is not None and unsure_why.startswith(
        "site lab-4's cells are read unsure: 24 of 30 cells (80.0%) uncertain or the models disagree")
    assert f"  warning: {unsure_why}: its slides are outside the validated domain" in listing.stdout
    why = ("site lab-4's 30 labelled cells are read right at 60.0% (balanced; 95% interval "
           f"45.0%-74.0%), below the 85% the node is validated for; {unsure_why}")
    assert job["result"]["validated_domain"] == f"outside the validated domain: {why}"
    sr_uid = job["result"]["objects"]["sr"]
    sr = dcmread(next((node.data_dir / "store").rglob(f"{sr_uid}.dcm")))
    texts = [str(el.value) for el in sr.iterall() if el.keyword == "TextValue"]
    named_network = next(t for t in texts if t.startswith("site_reference_network="))
    assert "refitted on 30 labelled cells" in named_network
    assert named_network.endswith(f"sha256 {summary['network_sha256']}")
    assert f"validated_domain=outside the validated domain: {why}" in texts
    assert ("site_verified=reported class right on 60.0% (balanced; 95% interval 45.0%-74.0%) of "
            "the site's 30 labelled cells, none read by a network fitted on it") in texts
    # the pathologist's case page says it before anything else
    page = client.get(f"/cases/{job['series_instance_uid']}").get_data(as_text=True)
    assert (f'id="domain-check" role="alert">This slide is outside the validated domain: '
            f"{why.replace(chr(39), '&#39;')}. Every cell is flagged for review") in page


@pytest.mark.slow  # a node analyses a whole slide
def test_a_calibration_of_another_reference_network_is_not_used_and_the_report_says_so(
        start_node, tmp_path: Path, blank_slide: list[Path]) -> None:
    """After an upgrade that changes the reference network, a site's stored shift lives in the
    old network's feature space: the job uses none, and its report and status say why."""
    import json

    from analysis.site import QUANTILE_GRID

    sites = tmp_path / "node" / "sites"
    sites.mkdir(parents=True)
    (sites / "lab-3.json").write_text(json.dumps({
        "site_id": "lab-3", "created": "2026-01-05T10:00:00+00:00", "cells": 120,
        "source": "lab-3 normal smears", "feature_shift": [0.5] * 64, "feature_threshold": 9.0,
        "flag_rate_before": 0.4, "flag_rate_after": 0.15, "median_distance": 6.0,
        "flag_share": 0.15, "distance_quantiles": list(np.linspace(2.0, 20.0, len(QUANTILE_GRID))),
        "reference_sha256": "0" * 64}))
    node = start_node(workers=1)
    storescu(node.port, *blank_slide)
    job = _wait_job(node)
    assert job["state"] == "done", job["error"]
    assert job["result"]["site_calibration"] == "none"
    sr_uid = job["result"]["objects"]["sr"]
    sr = dcmread(next((node.data_dir / "store").rglob(f"{sr_uid}.dcm")))
    texts = [str(el.value) for el in sr.iterall() if el.keyword == "TextValue"]
    warning = next(t for t in texts if t.startswith("site_calibration_warning="))
    assert ("site calibration lab-3 (2026-01-05, 120 cells) was fitted with another reference "
            "network" in warning and "not used" in warning
            and "run `cytonode calibrate-site` again for lab-3" in warning)
    assert "site_calibration=none" in texts
