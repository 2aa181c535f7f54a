"""C-STORE ingest throughput: CytoNode against DCMTK's storescp, in the same run.

Builds (or reuses) a JPEG VL Whole Slide Microscopy series of at least 200 MB from
real BCCD smear fields, then sends it with DCMTK's ``storescu -R -xy`` to a fresh
``cytonode serve`` and to a fresh ``storescp`` (bit-preserving, same disk),
alternating, and prints MB/s for both and their ratio (median of the rounds).

    .venv/bin/python bench/ingest.py [--rounds 3] [--slide DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import BCCD_IMAGES, echo, free_port


def build_slide(out: Path, min_bytes: int) -> list[Path]:
    from dicom_node.make_slide import make_slide

    fields = sorted(BCCD_IMAGES.glob("*.jpg"))
    repeat = 1
    while True:
        shutil.rmtree(out, ignore_errors=True)
        files = make_slide(fields, out, repeat=repeat, jpeg_quality=97, tile_size=512)
        size = sum(f.stat().st_size for f in files)
        print(f"slide: {len(files)} instances, {size / 1e6:.0f} MB (repeat={repeat})", file=sys.stderr)
        if size >= min_bytes:
            return files
        repeat = max(repeat + 1, int(repeat * min_bytes / size) + 1)


def wait_port(port: int, timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def send(port: int, aet: str, folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["storescu", "-R", "-xy", "+sd", "-aec", aet, "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - start


def round_storescp(folder: Path, work: Path) -> float:
    port, out = free_port(), work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "+B", "+xa", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send(port, "STORESCP", folder)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out)


def wait_http(port: int, timeout: float = 180) -> None:
    """Until the node's viewer answers ``/healthz``: the node has finished starting."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as rsp:
                if rsp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"cytonode's HTTP server on {port} did not answer")


def round_cytonode(folder: Path, work: Path) -> float:
    port, http_port, data = free_port(), free_port(), work / "cytonode"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYTONODE_")}
    env.update(CYTONODE_DATA_DIR=str(data), CYTONODE_DICOM_PORT=str(port),
               CYTONODE_HTTP_PORT=str(http_port),
               CYTONODE_BIND_ADDRESS="127.0.0.1", CYTONODE_WORKERS="0",
               CYTONODE_STABLE_AGE_S="3600")
    cytonode = str(Path(sys.executable).with_name("cytonode"))
    proc = subprocess.Popen([cytonode, "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not echo(port, calling="BENCH", timeout=2):
            if time.monotonic() > deadline:
                raise RuntimeError("cytonode did not start")
            time.sleep(0.3)
        # The SCP answers before the viewer has imported (highdicom, the encoders): about a
        # second of start-up that would otherwise share the cores with the first send.
        wait_http(http_port)
        return send(port, "CYTONODE", folder)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        shutil.rmtree(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slide", type=Path, help="reuse (or build into) this folder")
    parser.add_argument("--min-mb", type=int, default=200)
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} (DCMTK) is not installed")
    with tempfile.TemporaryDirectory(prefix="cytonode-bench-", dir=ROOT) as tmp:
        work = Path(tmp)
        slide = args.slide or work / "slide"
        files = sorted(slide.glob("*.dcm")) if slide.exists() else []
        if sum(f.stat().st_size for f in files) < args.min_mb * 1e6:
            files = build_slide(slide, args.min_mb * 1_000_000)
        mb = sum(f.stat().st_size for f in files) / 1e6
        times: dict[str, list[float]] = {"storescp": [], "cytonode": []}
        for r in range(args.rounds):
            for name, fn in (("storescp", round_storescp), ("cytonode", round_cytonode)):
                t = fn(slide, work)
                times[name].append(t)
                print(f"round {r + 1}: {name:9s} {mb / t:7.1f} MB/s ({t:.1f} s)", file=sys.stderr)
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {"series_mb": round(mb, 1), "instances": len(files), "rounds": args.rounds,
                  "storescp_mb_s": round(mb / med["storescp"], 1),
                  "cytonode_mb_s": round(mb / med["cytonode"], 1),
                  "ratio": round(med["storescp"] / med["cytonode"], 3)}
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
