"""``cytonode demo``: a node on free local ports receives the bundled sample slide.

Starts a node (SCP, router, outbox, embedded Celery worker) with a fresh data
directory, sends the sample slide by a real C-STORE, waits for its analysis job
and prints what the node found out. With ``--exit`` it stops afterwards.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE

from dicom_node.node import Node
from dicom_node.overview import node_status
from dicom_node.settings import Destination, Settings
from dicom_node.status import StatusValues

SAMPLE_SLIDE = Path(__file__).parent / "data" / "sample_slide"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def send_files(files: list[Path], port: int, ae_title: str) -> None:
    """C-STORE each file to the node, checking every status."""
    ae = AE(ae_title="DEMOPACS")
    for path in files:
        meta = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for i, path in enumerate(files, 1):
            rsp = assoc.send_c_store(dcmread(path))
            status = getattr(rsp, "Status", None)
            if status != StatusValues.SUCCESS:
                raise RuntimeError(f"C-STORE of {path.name} failed with status {status}")
            _say(f"  sent {i}/{len(files)}: {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    finally:
        assoc.release()


class StandInPACS:
    """A minimal storage SCP (pynetdicom) that keeps what the node sends it, for the demo."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import evt

        from dicom_node.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

        self.folder = folder
        self.received: list[tuple[str, str]] = []  # (modality, SOP Instance UID)
        self.ae = AE(ae_title="DEMOPACS")
        for uid in STORAGE_SOP_CLASSES.values():
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAXES.values()))
        self.port = _free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._handle_store)])

    def _handle_store(self, event: Any) -> int:
        ds = event.dataset  # read from the chunked-receive file
        uid = str(ds.SOPInstanceUID)
        if not UID(uid).is_valid:
            return int(StatusValues.INVALID_UIDS)
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{uid}.dcm", enforce_file_format=True)
        self.received.append((str(ds.get("Modality", "")), uid))
        return int(StatusValues.SUCCESS)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def run_demo(args: argparse.Namespace) -> int:
    files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no sample slide in {SAMPLE_SLIDE}")
    data_dir = Path(tempfile.mkdtemp(prefix="cytonode-demo-"))
    (data_dir / "pacs").mkdir()
    pacs = StandInPACS(data_dir / "pacs")
    settings = Settings(data_dir=data_dir, bind_address="127.0.0.1", dicom_port=_free_port(),
                        http_port=_free_port(), stable_age_s=2.0, workers=1, outbox_retry_initial_s=0.5,
                        destinations=(Destination("DEMOPACS", "127.0.0.1", pacs.port),))
    node = Node(settings)
    node.start()
    try:
        _say(f"stand-in PACS DEMOPACS (a pynetdicom storage SCP) on 127.0.0.1:{pacs.port}")
        _say(f"CytoNode demo: node {settings.ae_title} on 127.0.0.1:{settings.dicom_port}, "
             f"data in {data_dir}")
        _say(f"sending the sample slide ({len(files)} instances) by C-STORE ...")
        send_files(files, settings.dicom_port, settings.ae_title)
        _say(f"waiting for the series to be stable ({settings.stable_age_s:.0f} s) and analysed ...")
        deadline = time.monotonic() + args.timeout
        job: dict[str, object] | None = None
        while time.monotonic() < deadline:
            jobs = node_status(node.store)["jobs"]
            job = jobs[0] if jobs else None
            if job and job["state"] in ("done", "failed"):
                break
            time.sleep(1.0)
        if not job or job["state"] != "done":
            raise RuntimeError(f"the analysis job did not finish: {job}")
        result = job["result"]
        assert isinstance(result, dict)
        _say("slide received and opened:")
        _say(f"  {result['width']} x {result['height']} px at "
             f"{result['pixel_spacing_um'][0]:.3f} um/px, {len(result['levels'])} levels, "
             f"{result['frames']} frames in {result['instances']} instances")
        _say(f"white cells: {result['cell_count']} "
             f"({result['review']} flagged for review, {result['abnormal']} suspected abnormal)")
        _say("differential (percentage with 95% Wilson interval):")
        for row in result["differential"]:
            if row["count"]:
                low, high = row["ci95"]
                _say(f"  {row['label']:13s} {row['count']:4d}  {row['percentage']:5.1f} %  "
                     f"[{low:5.1f}, {high:5.1f}]")
        _say("results stored: " + ", ".join(sorted(result["objects"])))
        _say("sending the results to the stand-in PACS ...")
        while time.monotonic() < deadline and len(pacs.received) < len(result["objects"]):
            time.sleep(0.5)
        if len(pacs.received) < len(result["objects"]):
            raise RuntimeError(f"the stand-in PACS got {len(pacs.received)} of "
                               f"{len(result['objects'])} results: {node_status(node.store)['outbox']}")
        for modality, uid in pacs.received:
            _say(f"  DEMOPACS received {modality}: {uid}")
        if not args.exit:
            _say(f"the node keeps running; send more with: storescu -R -xy -aec {settings.ae_title} "
                 f"127.0.0.1 {settings.dicom_port} FILES  (Ctrl-C stops)")
            node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        pacs.stop()
    return 0


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a node and send it the bundled sample slide")
    p.add_argument("--exit", action="store_true", help="stop once the results are in")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the analysis")
    p.set_defaults(func=run_demo)
