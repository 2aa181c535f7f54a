"""The SCP against real peers: DCMTK's echoscu/storescu and pynetdicom SCUs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from dicom_node.status import StatusValues
from tests.dicom_factory import comprehensive_3d_sr, dataset_digest, multiframe_sc, with_new_uids
from tests.peers import HIGHDICOM_FILES, echo, require_tool

WSI = HIGHDICOM_FILES / "sm_image.dcm"
OBJECTS = [HIGHDICOM_FILES / n for n in ("sm_annotations.dcm", "seg_image_sm_dots.dcm",
                                         "seg_image_sm_numbers.dcm")]
JPEG_LS_WSI = HIGHDICOM_FILES / "sm_image_jpegls.dcm"


def stored_files(node) -> dict[str, Path]:
    return {p.stem: p for p in (node.data_dir / "store").rglob("*.dcm")}


def test_dcmtk_echo_and_store_wsi_and_results(start_scp, tmp_path: Path) -> None:
    echoscu, storescu = require_tool("echoscu"), require_tool("storescu")
    node = start_scp(allowed_aes="STORESCU,ECHOSCU,TESTSCU")
    subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "CYTONODE", "127.0.0.1", str(node.port)],
                   check=True, timeout=60)
    files = [WSI, *OBJECTS, comprehensive_3d_sr(WSI, tmp_path / "sr.dcm")]
    run = subprocess.run([storescu, "-R", "-xy", "-aet", "STORESCU", "-aec", "CYTONODE",
                          "127.0.0.1", str(node.port), *map(str, files)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    # DCMTK proposes one family of transfer syntaxes a call: JPEG-LS goes in its own.
    run = subprocess.run([storescu, "-R", "-xt", "-aet", "STORESCU", "-aec", "CYTONODE",
                          "127.0.0.1", str(node.port), str(JPEG_LS_WSI)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    files.append(JPEG_LS_WSI)
    stored = stored_files(node)
    for source in files:
        uid, syntax, content = dataset_digest(source)
        assert uid in stored, f"{source.name} was not stored"
        got_uid, got_syntax, got_content = dataset_digest(stored[uid])
        assert (got_uid, got_content) == (uid, content)
        # Stored as received, never transcoded: a compressed instance keeps its syntax.
        # (storescu itself may send an implicit-VR file as explicit VR.)
        if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            assert got_syntax == syntax
    status = node.status()
    instances = {s["series_instance_uid"]: s for s in status["series"]}
    wsi = dcmread(WSI, stop_before_pixels=True)
    assert instances[wsi.SeriesInstanceUID]["frames"] == int(wsi.NumberOfFrames)
    assert sum(s["instances"] for s in status["series"]) == len(files)
    assert {s["modality"] for s in status["series"]} == {"SM", "ANN", "SEG", "SR"}


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(start_scp) -> None:
    echoscu = require_tool("echoscu")
    node = start_scp(allowed_aes="TESTSCU")
    bad = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "CYTONODE", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr or "rejected" in bad.stderr.lower()
    assert not echo(node.port, calling="TESTSCU", called="SOMEONEELSE")
    assert echo(node.port, calling="TESTSCU")


def _store(port: int, path: Path, calling: str = "TESTSCU") -> int:
    ds = dcmread(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CYTONODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status)
    finally:
        assoc.release()


def test_bad_input_gets_named_failures_and_node_keeps_answering(start_scp, tmp_path: Path) -> None:
    node = start_scp()
    # Invalid UIDs.
    bad_uid = with_new_uids(OBJECTS[0], tmp_path / "bad_uid.dcm")
    ds = dcmread(bad_uid)
    ds.StudyInstanceUID = "1.2.3.x.4"
    ds.save_as(bad_uid)
    assert _store(node.port, bad_uid) == StatusValues.INVALID_UIDS
    # A dataset whose bytes cannot be decoded: valid file meta, garbage body,
    # sent raw by pynetdicom's chunked sender.
    good = with_new_uids(OBJECTS[0], tmp_path / "good.dcm")
    raw = good.read_bytes()
    meta = dcmread(good, stop_before_pixels=True)
    meta_len = 132 + 12 + int(meta.file_meta.FileMetaInformationGroupLength)
    corrupt = tmp_path / "corrupt.dcm"
    # A dataset cut short in the middle of an element: never acknowledged.
    corrupt.write_bytes(raw[:meta_len + (len(raw) - meta_len) // 2])
    assert _send_raw(node.port, corrupt) == StatusValues.CANNOT_UNDERSTAND
    assert echo(node.port)
    # The dataset says Secondary Capture while the request says Bulk Annotations.
    mismatch = tmp_path / "mismatch.dcm"
    ds = dcmread(with_new_uids(OBJECTS[0], mismatch))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.save_as(mismatch)  # file meta still names the annotations class
    assert _send_raw(node.port, mismatch) == StatusValues.SOP_CLASS_MISMATCH
    assert echo(node.port)
    assert not any(True for _ in (node.data_dir / "tmp").iterdir())
    assert node.status()["series"] == []
    assert not list((node.data_dir / "store").rglob("*.dcm"))


def _send_raw(port: int, path: Path) -> int:
    """Send a file's bytes as they are (pynetdicom's chunked sender), under its file meta's UIDs."""
    from pynetdicom import _config

    meta = dcmread(path, stop_before_pixels=True).file_meta
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CYTONODE")
        assert assoc.is_established
        rsp = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(rsp.Status)


def test_resend_is_idempotent_and_changed_content_follows_policy(start_scp, tmp_path: Path) -> None:
    node = start_scp()
    path = multiframe_sc(tmp_path / "sc.dcm", 2)
    assert _store(node.port, path) == StatusValues.SUCCESS
    assert _store(node.port, path) == StatusValues.SUCCESS
    status = node.status()
    assert [s["instances"] for s in status["series"]] == [1]
    stored = stored_files(node)
    original = dataset_digest(path)
    # Same SOP Instance UID, different pixels: default policy keeps the first.
    changed = tmp_path / "changed.dcm"
    ds = dcmread(path)
    ds.PixelData = bytes(255 - b for b in ds.PixelData)
    ds.save_as(changed)
    assert _store(node.port, changed) == StatusValues.SUCCESS
    assert dataset_digest(stored[original[0]]) == original
    assert "different content" in node.log()


def test_overwrite_policy_replaces_changed_content(start_scp, tmp_path: Path) -> None:
    node = start_scp(duplicate_policy="overwrite")
    path = multiframe_sc(tmp_path / "sc.dcm", 1)
    assert _store(node.port, path) == StatusValues.SUCCESS
    changed = tmp_path / "changed.dcm"
    ds = dcmread(path)
    ds.PixelData = bytes(255 - b for b in ds.PixelData)
    ds.save_as(changed)
    assert _store(node.port, changed) == StatusValues.SUCCESS
    stored = stored_files(node)
    assert dataset_digest(stored[str(ds.SOPInstanceUID)]) == dataset_digest(changed)
    assert [s["instances"] for s in node.status()["series"]] == [1]
