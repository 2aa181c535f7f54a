"""Peak memory of ``cytonode detect`` on a generated 40,000 x 40,000 px slide.

Builds the slide with :func:`dicom_node.make_slide.make_slide` from a few BCCD
fields repeated on a grid (not committed: it is written under ``--workdir``),
then runs ``cytonode detect SLIDE --json`` as a child process and reports its
peak resident set size (``ru_maxrss`` of the waited child), its wall time and
the number of cells. Prints one JSON object.

Usage::

    .venv/bin/python bench/detect_memory.py --workdir /tmp/cytonode-bench [--size 40000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.make_slide import make_slide

FIELD = (640, 480)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size", type=int, default=40000, help="slide width and height, px")
    parser.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd/BCCD"))
    parser.add_argument("--fields", type=int, default=24, help="distinct BCCD fields used")
    parser.add_argument("--limit-gb", type=float, default=2.0)
    args = parser.parse_args()
    slide = args.workdir / f"slide_{args.size}"
    columns = math.ceil(args.size / FIELD[0])
    rows = math.ceil(args.size / FIELD[1])
    build_s = 0.0
    if not slide.exists():
        images = sorted((args.bccd / "JPEGImages").glob("*.jpg"))[: args.fields]
        t0 = time.perf_counter()
        make_slide(images, slide, columns=columns, rows=rows, jpeg_quality=80)
        build_s = time.perf_counter() - t0
    size_mb = sum(p.stat().st_size for p in slide.iterdir()) / 1e6
    cmd = [sys.executable, "-c", "import sys; from dicom_node.app.cli import main; sys.exit(main())",
           "detect", str(slide), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-2000:])
        return 1
    cells = json.loads(out)["cells"]
    megapixels = columns * FIELD[0] * rows * FIELD[1] / 1e6
    result = {
        "slide_px": [columns * FIELD[0], rows * FIELD[1]], "slide_mb": round(size_mb, 1),
        "build_s": round(build_s, 1), "detect_s": round(wall, 1),
        "seconds_per_megapixel": round(wall / megapixels, 4),
        "peak_rss_gb": round(peak_gb, 3), "limit_gb": args.limit_gb,
        "cells": len(cells), "cpu_count": os.cpu_count(),
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if peak_gb < args.limit_gb else 1


if __name__ == "__main__":
    sys.exit(main())
