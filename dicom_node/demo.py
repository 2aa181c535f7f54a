"""``cytonode demo``: a node on free local ports receives the bundled sample slide.

Starts a node (SCP, router, outbox, embedded Celery worker) with a fresh data
directory, sends the sample slide by a real C-STORE, waits for its analysis job
and prints what the node found out. With ``--exit`` it stops afterwards.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from dicom_node.node import Node
from dicom_node.overview import node_status
from dicom_node.settings import Settings
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


def run_demo(args: argparse.Namespace) -> int:
    files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no sample slide in {SAMPLE_SLIDE}")
    data_dir = Path(tempfile.mkdtemp(prefix="cytonode-demo-"))
    settings = Settings(data_dir=data_dir, bind_address="127.0.0.1", dicom_port=_free_port(),
                        stable_age_s=2.0, workers=1)
    node = Node(settings)
    node.start()
    try:
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
        _say(f"results stored: {', '.join(sorted(result['objects']))} "
             f"({', '.join(result['objects'].values())})")
        _say(json.dumps(node_status(node.store)["series"], indent=2))
        if not args.exit:
            _say(f"the node keeps running; send more with: storescu -R -xy -aec {settings.ae_title} "
                 f"127.0.0.1 {settings.dicom_port} FILES  (Ctrl-C stops)")
            node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a node and send it the bundled sample slide")
    p.add_argument("--exit", action="store_true", help="stop once the results are in")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the analysis")
    p.set_defaults(func=run_demo)
