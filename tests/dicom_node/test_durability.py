"""Durability: kill -9 during large stores, a full disk, and a clean SIGTERM."""

from __future__ import annotations

import errno
import os
import random
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from dicom_node.net.ae import configure_pynetdicom, make_ae
from dicom_node.settings import Settings
from dicom_node.status import StatusValues
from dicom_node.store.files import Store
from tests.dicom_factory import dataset_digest, multiframe_sc
from tests.peers import echo, free_port

TRIALS = 4


def _send_all(port: int, files: list[Path], acked: list[str], stop: threading.Event) -> None:
    ae = AE(ae_title="TESTSCU")
    ds0 = dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(ds0.SOPClassUID, ds0.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CYTONODE")
    if not assoc.is_established:
        return
    for path in files:
        if stop.is_set() or not assoc.is_established:
            break
        ds = dcmread(path)
        try:
            rsp = assoc.send_c_store(ds)
        except RuntimeError:  # the node was killed between two sends
            break
        if getattr(rsp, "Status", None) == StatusValues.SUCCESS:
            acked.append(str(ds.SOPInstanceUID))
    if assoc.is_established:
        assoc.release()


def _index_rows(data_dir: Path) -> list[tuple[str, str, int]]:
    con = sqlite3.connect(data_dir / "index.sqlite")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute("SELECT sop_instance_uid, path, size FROM instances").fetchall()
    finally:
        con.close()


def test_kill_9_during_stores_loses_nothing_acknowledged(start_node, tmp_path: Path) -> None:
    # Real images: 12 BCCD fields a file, about 11 MB each, uncompressed.
    files = [multiframe_sc(tmp_path / "src" / f"{i}.dcm", 12, start=i * 12) for i in range(10)]
    digests = {dataset_digest(f)[0]: dataset_digest(f)[2] for f in files}
    rng = random.Random(7)
    node = start_node("node")
    acks = 0
    for trial in range(TRIALS):
        acked: list[str] = []
        stop = threading.Event()
        order = rng.sample(files, len(files))  # resends and new instances, mixed
        sender = threading.Thread(target=_send_all, args=(node.port, order, acked, stop))
        sender.start()
        deadline = time.monotonic() + 60
        while len(acked) < 2 + trial and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next store
        node.kill()
        stop.set()
        sender.join(timeout=60)
        acks += len(acked)
        node.start()
        rows = _index_rows(node.data_dir)
        indexed = {uid for uid, _, _ in rows}
        # Every acknowledged instance is indexed, present and intact.
        assert set(acked) <= indexed, f"trial {trial}: lost {set(acked) - indexed}"
        for uid, rel, size in rows:
            path = node.data_dir / "store" / rel
            assert path.exists(), f"trial {trial}: index points at a missing file {rel}"
            assert dataset_digest(path)[2] == digests[uid], f"trial {trial}: {uid} is corrupt"
        # Restart cleaned what the kill left half-written.
        assert not list((node.data_dir / "tmp").iterdir())
    assert acks >= sum(2 + t for t in range(TRIALS))


def test_full_disk_answers_out_of_resources_and_indexes_nothing(tmp_path: Path, monkeypatch) -> None:
    settings = Settings(data_dir=tmp_path / "data", dicom_port=free_port(), bind_address="127.0.0.1",
                        workers=0)
    configure_pynetdicom(settings)
    store = Store(settings)
    ae, handlers = make_ae(settings, store)
    server = ae.start_server(("127.0.0.1", settings.dicom_port), block=False, evt_handlers=handlers)
    try:
        real_fsync = os.fsync

        def full_fsync(fd: int) -> None:  # the OS fails: no space left on device
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full_fsync)
        path = multiframe_sc(tmp_path / "sc.dcm", 1)
        ds = dcmread(path)
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", settings.dicom_port, ae_title="CYTONODE")
        rsp = assoc.send_c_store(ds)
        assoc.release()
        assert rsp.Status == StatusValues.OUT_OF_RESOURCES
        assert _index_rows(settings.data_dir) == []
        assert not list(settings.store_dir.rglob("*.dcm"))
        assert echo(settings.dicom_port)
        # Space is back: the same instance is accepted.
        monkeypatch.setattr(os, "fsync", real_fsync)
        assoc = scu.associate("127.0.0.1", settings.dicom_port, ae_title="CYTONODE")
        assert assoc.send_c_store(ds).Status == StatusValues.SUCCESS
        assoc.release()
        assert len(_index_rows(settings.data_dir)) == 1
    finally:
        server.shutdown()
        store.close()


def test_disk_filling_during_receive_drops_the_data_set_at_the_reserve(tmp_path: Path, monkeypatch,
                                                                        caplog) -> None:
    """Free space falls below the reserve while a 55 MB data set arrives: its partial file is
    deleted then, not once the whole data set is in ``tmp/``; the node answers 0xA700, logs one
    line and keeps running."""
    settings = Settings(data_dir=tmp_path / "data", dicom_port=free_port(), bind_address="127.0.0.1",
                        workers=0)
    configure_pynetdicom(settings)
    store = Store(settings)
    ae, handlers = make_ae(settings, store)
    server = ae.start_server(("127.0.0.1", settings.dicom_port), block=False, evt_handlers=handlers)
    headroom = 12 << 20  # free space above the reserve before the data set arrives

    def tmp_bytes() -> int:
        total = 0
        for entry in settings.tmp_dir.iterdir():
            try:
                total += entry.stat().st_size
            except FileNotFoundError:  # deleted between the listing and the stat
                pass
        return total

    real_disk_usage = shutil.disk_usage

    def filling_disk_usage(path: str | os.PathLike[str]) -> object:
        # The OS reports the space the data set being written takes from the file system.
        usage = real_disk_usage(path)
        return usage._replace(free=settings.min_free_bytes + headroom - tmp_bytes())

    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], tmp_bytes())

    try:
        ds = dcmread(multiframe_sc(tmp_path / "sc.dcm", 60))
        assert len(ds.PixelData) > 4 * headroom
        monkeypatch.setattr(shutil, "disk_usage", filling_disk_usage)
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        scu.dimse_timeout = scu.network_timeout = 60
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        assoc = scu.associate("127.0.0.1", settings.dicom_port, ae_title="CYTONODE")
        with caplog.at_level("INFO", logger="dicom_node"):
            rsp = assoc.send_c_store(ds)
        done.set()
        sampler.join()
        assert rsp.Status == StatusValues.OUT_OF_RESOURCES
        assert assoc.is_established, "the association should survive a refused data set"
        assoc.release()
        # Checked every 4 MiB (FREE_SPACE_CHECK_BYTES), written in fragments of up to 4 MiB.
        assert peak[0] < headroom + (10 << 20), f"tmp/ held {peak[0] / 2**20:.0f} MiB"
        assert tmp_bytes() == 0 and not list(settings.tmp_dir.iterdir())
        assert _index_rows(settings.data_dir) == []
        lines = [r.getMessage() for r in caplog.records if str(ds.SOPInstanceUID) in r.getMessage()]
        assert len(lines) == 1 and "out of resources" in lines[0], lines
        assert echo(settings.dicom_port)
        # Space is back: the same instance is accepted.
        monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
        assoc = scu.associate("127.0.0.1", settings.dicom_port, ae_title="CYTONODE")
        assert assoc.send_c_store(ds).Status == StatusValues.SUCCESS
        assoc.release()
        assert len(_index_rows(settings.data_dir)) == 1
    finally:
        done.set()
        server.shutdown()
        store.close()


def test_sigterm_finishes_in_flight_store_and_exits_cleanly(start_node, tmp_path: Path) -> None:
    files = [multiframe_sc(tmp_path / "src" / f"{i}.dcm", 24, start=i) for i in range(2)]
    node = start_node("node")
    acked: list[str] = []
    stop = threading.Event()
    sender = threading.Thread(target=_send_all, args=(node.port, files, acked, stop))
    sender.start()
    time.sleep(0.5)
    assert node.stop() == 0
    sender.join(timeout=60)
    rows = _index_rows(node.data_dir)
    assert {uid for uid, _, _ in rows} >= set(acked)
    assert "stopped" in node.log()


@pytest.fixture(autouse=True)
def _restore_pynetdicom_flags() -> None:
    from pynetdicom import _config

    yield
    _config.STORE_RECV_CHUNKED_DATASET = False
    _config.STORE_SEND_CHUNKED_DATASET = False
