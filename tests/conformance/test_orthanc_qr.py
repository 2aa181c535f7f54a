"""Orthanc queries the node (C-FIND) and retrieves from it (C-MOVE to Orthanc)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests
from pydicom import dcmread

from tests.conformance.conftest import SAMPLE_SLIDE
from tests.dicom_factory import comprehensive_3d_sr, dataset_digest
from tests.peers import HIGHDICOM_FILES, NodeProcess, OrthancProcess, free_port, require_tool


def test_orthanc_queries_and_retrieves_from_the_node(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", {"CYTONODE": ("CYTONODE", node_port)})
    node = NodeProcess(tmp_path / "node", allowed_aes=f"{orthanc.aet},STORESCU",
                       move_destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    node.port = node_port
    node.env["CYTONODE_DICOM_PORT"] = str(node_port)
    orthanc.start()
    try:
        node.start()
        slide = sorted(SAMPLE_SLIDE.glob("*.dcm"))
        sr = comprehensive_3d_sr(HIGHDICOM_FILES / "sm_image.dcm", tmp_path / "sr.dcm")
        subprocess.run([storescu, "-R", "-xy", "-aet", "STORESCU", "-aec", "CYTONODE", "127.0.0.1",
                        str(node.port), *map(str, slide), str(sr)], check=True, timeout=120)
        study = str(dcmread(slide[0], stop_before_pixels=True).StudyInstanceUID)

        # C-FIND from Orthanc, study level with a wildcard
        rsp = requests.post(f"{orthanc.url}/modalities/cytonode/query", timeout=60, json={
            "Level": "Study", "Query": {"PatientName": "BCCD*", "StudyInstanceUID": "",
                                        "StudyDate": "20000101-"}})
        assert rsp.ok, rsp.text
        query = rsp.json()["ID"]
        answers = requests.get(f"{orthanc.url}/queries/{query}/answers?expand", timeout=30).json()
        assert [a["0020,000d"]["Value"] for a in answers] == [study]

        # series level
        rsp = requests.post(f"{orthanc.url}/modalities/cytonode/query", timeout=60, json={
            "Level": "Series", "Query": {"StudyInstanceUID": study, "Modality": "SM",
                                         "SeriesInstanceUID": ""}})
        assert rsp.ok, rsp.text
        series = requests.get(f"{orthanc.url}/queries/{rsp.json()['ID']}/answers?expand",
                              timeout=30).json()
        assert len(series) == 1

        # retrieve the study found (C-MOVE to Orthanc, JPEG WSM as stored)
        rsp = requests.post(f"{orthanc.url}/queries/{query}/answers/0/retrieve", timeout=120,
                            json={"TargetAet": orthanc.aet, "Synchronous": True})
        assert rsp.ok, rsp.text
        for path in slide:
            uid, syntax, content = dataset_digest(path)
            found = orthanc.find_instance(uid)
            assert len(found) == 1, f"{path.name} did not reach Orthanc"
            got = requests.get(f"{orthanc.url}/instances/{found[0]}/file", timeout=30).content
            (tmp_path / "got.dcm").write_bytes(got)
            assert dataset_digest(tmp_path / "got.dcm") == (uid, syntax, content)

        # /modalities/NAME/move of one instance (the SR, another study)
        sr_ds = dcmread(sr, stop_before_pixels=True)
        rsp = requests.post(f"{orthanc.url}/modalities/cytonode/move", timeout=120, json={
            "Level": "Instance", "TargetAet": orthanc.aet, "Synchronous": True,
            "Resources": [{"StudyInstanceUID": str(sr_ds.StudyInstanceUID),
                           "SeriesInstanceUID": str(sr_ds.SeriesInstanceUID),
                           "SOPInstanceUID": str(sr_ds.SOPInstanceUID)}]})
        assert rsp.ok, rsp.text
        assert len(orthanc.find_instance(str(sr_ds.SOPInstanceUID))) == 1
    finally:
        node.cleanup()
        orthanc.stop()
