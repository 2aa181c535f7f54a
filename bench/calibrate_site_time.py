"""How long ``cytonode calibrate-site --labelled`` takes as it is by default (fine-tuned where the
rule allows, with the site's own uncertainty threshold) and with ``--no-finetune``, with 10 named
cells a class (criterion of 2026-12-06 02:09 in ``analysis/training/criteria.txt``: at most 15
minutes of wall time on 2 cores with nothing else running).

The site is Chula's val and test cells in a stain no training lab used
(:func:`analysis.training.site_readable.other_stain`), so that the shipped models read its
named cells below the validated level and the fine-tune rule lets both fine-tunes run (in
Chula's own stain nothing would be trained): 10 named cells a class from val (seed 0), the
rest of val + test unnamed, framed crops written as PNG. Each command is run once as a
subprocess, as a user runs it; the baseline (``--no-finetune``) runs first, in the same run.
Prints the wall times, their ratio and what each calibration chose.

    .venv/bin/python bench/calibrate_site_time.py [--threads N] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.classes import CLASS_NAMES
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.training.labs import concat, load_lab
from analysis.training.site_readable import other_stain

#: The reference network's input size: the crops are written at it.
CROP = 96


def write(images: np.ndarray, folder: Path, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}_{i:04d}.png")


def calibrate(site: Path, named: Path, site_id: str, finetune: bool, threads: int) -> tuple[float, dict]:
    command = [sys.executable, "-m", "dicom_node.app.cli", "calibrate-site", str(site / "cells"),
               "--labelled", str(named), "--id", site_id, "--pixel-spacing",
               str(FIELD_OF_VIEW_UM / CROP), "--data-dir", str(site / "var"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    run = subprocess.run([*command, *([] if finetune else ["--no-finetune"])], cwd=ROOT, env=env,
                         check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"calibrate-site failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return wall, json.loads(run.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--per-class", type=int, default=10)
    args = p.parse_args()
    val = load_lab(args.data, "chula", "val", CROP, FIELD_OF_VIEW_UM)
    shot = val.per_class(args.per_class, seed=0)
    drawn = set(shot.paths)
    rest = concat([val.take(np.array([i for i, q in enumerate(val.paths) if q not in drawn])),
                   load_lab(args.data, "chula", "test", CROP, FIELD_OF_VIEW_UM)])
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        for c in np.unique(shot.labels):
            write(other_stain(shot.images[shot.labels == c]), site / "named" / CLASS_NAMES[c], "cell")
        write(other_stain(rest.images), site / "cells", "cell")
        counts = ", ".join(f"{CLASS_NAMES[c]} {int((shot.labels == c).sum())}" for c in np.unique(shot.labels))
        print(f"Chula in another stain: {len(shot)} named cells ({counts}), {len(rest)} unnamed; "
              f"{args.threads} threads", flush=True)
        rows = {}
        for name, finetune in (("--no-finetune", False), ("default (fine-tuned)", True)):
            wall, summary = calibrate(site, site / "named", "tuned" if finetune else "refit",
                                      finetune, args.threads)
            gate = summary["site_network"]
            rows[name] = wall
            print(f"  {name:22s} {wall / 60:6.1f} min; site network {'used' if gate['used'] else 'not used'}"
                  f" ({gate['shipped_accuracy']:.2f} shipped, {gate['site_accuracy']:.2f} site)"
                  f"{'; ' + gate['finetune_rule'] if 'finetune_rule' in gate else ''}; fine-tuned "
                  f"{gate['finetuned']}; verified {summary['verified']['text']}"
                  f"{'; site threshold ' + str(summary['uncertainty_threshold']) if 'uncertainty_threshold' in summary else ''}",
                  flush=True)
    print(f"  ratio: {rows['default (fine-tuned)'] / rows['--no-finetune']:.1f}x the calibration without fine-tuning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
