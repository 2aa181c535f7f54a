"""Orthanc as the PACS: it pushes slides to the node; the node's outbox delivers to it."""

from __future__ import annotations

import time
from pathlib import Path

import requests
from pydicom import dcmread

from dicom_node.settings import Settings
from dicom_node.store.files import Store
from dicom_node.store.outbox import enqueue
from tests.dicom_factory import comprehensive_3d_sr, dataset_digest, with_new_uids
from tests.peers import HIGHDICOM_FILES, NodeProcess, OrthancProcess, free_port

WSI = HIGHDICOM_FILES / "sm_image.dcm"


def _enqueue_created_instance(node: NodeProcess, source: Path, tmp_path: Path) -> str:
    """Store an instance as the node does for what it creates, and queue it (real API,
    same index and data directory as the running node)."""
    settings = Settings.from_env(node.env)
    store = Store(settings)
    try:
        sr = dcmread(comprehensive_3d_sr(source, tmp_path / "result.dcm"))
        result = store.add_dataset(sr)
        assert enqueue(store, result.sop_instance_uid) == 1
        return result.sop_instance_uid
    finally:
        store.close()


def test_orthanc_pushes_a_series_and_receives_the_outbox(start_node, tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", {"CYTONODE": ("CYTONODE", node_port)})
    node = NodeProcess(tmp_path / "node", allowed_aes=f"{orthanc.aet},TESTSCU",
                       destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                       outbox_retry_initial_s=0.5, outbox_retry_max_s=2)
    node.port = node_port
    node.env["CYTONODE_DICOM_PORT"] = str(node_port)
    orthanc.start()
    try:
        node.start()
        # The PACS routes a slide series to the node (Orthanc's REST API, real C-STORE).
        wsi = with_new_uids(WSI, tmp_path / "wsi.dcm")
        uploaded = orthanc.upload(wsi)
        rsp = requests.post(f"{orthanc.url}/modalities/cytonode/store",
                            json={"Resources": [uploaded["ParentSeries"]], "Synchronous": True},
                            timeout=120)
        assert rsp.ok, rsp.text
        status = node.status()
        assert [s["instances"] for s in status["series"]] == [1]
        stored = next((node.data_dir / "store").rglob(f"{dcmread(wsi).SOPInstanceUID}.dcm"))
        assert dataset_digest(stored)[2] == dataset_digest(wsi)[2]
        # The node's outbox delivers an instance it created back into Orthanc.
        sop_uid = _enqueue_created_instance(node, wsi, tmp_path)
        node.wait_for(lambda s: s["outbox"]["sent"] == 1, what="outbox delivery")
        found = orthanc.find_instance(sop_uid)
        assert len(found) == 1
        tags = requests.get(f"{orthanc.url}/instances/{found[0]}/simplified-tags", timeout=30).json()
        assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"
        # And Orthanc serves it on DICOMweb.
        study = tags["StudyInstanceUID"]
        qido = requests.get(f"{orthanc.url}/dicom-web/studies/{study}/instances", timeout=30)
        assert qido.ok and any(i["00080018"]["Value"][0] == sop_uid for i in qido.json())
    finally:
        node.cleanup()
        orthanc.stop()


def test_outbox_survives_destination_down_and_node_restart(tmp_path: Path) -> None:
    orthanc = OrthancProcess(tmp_path / "orthanc", {})
    node = NodeProcess(tmp_path / "node", destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                       outbox_retry_initial_s=0.5, outbox_retry_max_s=1)
    try:
        node.start()
        sop_uid = _enqueue_created_instance(node, WSI, tmp_path)
        # The destination is down: the row stays pending and records its failures.
        status = node.wait_for(lambda s: s["outbox"]["items"] and
                               s["outbox"]["items"][0]["attempts"] >= 2, what="retries")
        item = status["outbox"]["items"][0]
        assert item["state"] == "pending" and item["last_error"]
        assert node.stop() == 0
        orthanc.start()
        node.start()
        node.wait_for(lambda s: s["outbox"]["sent"] == 1, what="delivery after restart")
        time.sleep(3)  # give a duplicate send the chance to happen
        assert len(orthanc.find_instance(sop_uid)) == 1
        stats = requests.get(f"{orthanc.url}/statistics", timeout=30).json()
        assert stats["CountInstances"] == 1
    finally:
        node.cleanup()
        orthanc.stop()
