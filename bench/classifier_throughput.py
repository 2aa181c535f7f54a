"""Cells per second of the shipped classifier, against a baseline measured in the same run.

The node's classify stage is the diffusion classifier (its calibrated budget, adaptive) plus the
review rule's EfficientNet-Lite0 reference and feature density. This machine is shared and noisy,
so each arm is timed ``--repeats`` times, interleaved, and reported as its median together with the
ratio to a fixed baseline timed in the same rounds: the UNet itself evaluating one batch of the same
size for every class at one timestep (the unit of work the classifier's budget is counted in).

    .venv/bin/python bench/classifier_throughput.py --cells 64 --repeats 3 --threads 2

Prints one JSON object: cells/s of the diffusion classifier alone, of the reference with the feature
density, of both together (what a slide's classify stage costs), the baseline's UNet evaluations/s,
and the classifier's UNet evaluations per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch

    from analysis.classifier import WEIGHTS_DIR, DiffusionClassifier
    from analysis.classify import images_to_tensor
    from analysis.framing import FIELD_OF_VIEW_UM
    from analysis.review import ReviewModel
    from analysis.training.labs import load_lab

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cells", type=int, default=64, help="PBC test cells (8 per class at 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = DiffusionClassifier(WEIGHTS_DIR)
    review = ReviewModel.load(WEIGHTS_DIR, model.calibration)
    per_class = max(1, args.cells // 8)
    small = load_lab(args.data, "pbc", "test", model.image_size, FIELD_OF_VIEW_UM).per_class(per_class)
    large = (load_lab(args.data, "pbc", "test", review.image_size, FIELD_OF_VIEW_UM).per_class(per_class)
             if review is not None else None)
    n = len(small)
    x = images_to_tensor(small.images)
    n_classes = len(model.model_config.class_names)

    def diffusion() -> np.ndarray:
        pred = model.predict(small.images, torch.Generator("cpu").manual_seed(0))
        return pred.unet_evals

    def reference() -> None:
        if review is not None and large is not None:
            review.assess(np.full((n, n_classes), 1.0 / n_classes), np.zeros(n), large.images)

    @torch.no_grad()
    def baseline() -> None:  # the UNet on the same cells, every class, one timestep
        t = torch.full((n,), 250, dtype=torch.long)
        for c in range(n_classes):
            model.unet(x, t, class_labels=torch.full((n,), c, dtype=torch.long))

    times: dict[str, list[float]] = {"diffusion": [], "reference": [], "baseline": []}
    evals = None
    diffusion()  # warm-up (allocations, first-call costs)
    for _ in range(args.repeats):
        for name, fn in (("baseline", baseline), ("diffusion", diffusion), ("reference", reference)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "diffusion":
                evals = out
    med = {k: statistics.median(v) for k, v in times.items()}
    baseline_evals_per_s = n * n_classes / med["baseline"]
    result = {
        "cells": n, "threads": args.threads, "repeats": args.repeats,
        "diffusion_cells_per_s": round(n / med["diffusion"], 2),
        "reference_and_density_cells_per_s": round(n / med["reference"], 1) if review else None,
        "classify_stage_cells_per_s": round(n / (med["diffusion"] + med["reference"]), 2),
        "baseline_unet_evals_per_s": round(baseline_evals_per_s, 1),
        "unet_evals_per_cell": round(float(np.mean(evals)), 1) if evals is not None else None,
        "classify_stage_cells_per_s_over_baseline_evals_per_s": round(
            (n / (med["diffusion"] + med["reference"])) / baseline_evals_per_s, 5),
        "seconds": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
