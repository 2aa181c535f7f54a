"""Could the posterior or the review flag do better with the same denoising errors? (PBC val)

Scores val cells with a diffusion model (its calibration's budget, the adaptive procedure) and
asks two questions of the errors, on val only:

1. Class offsets: a per-class bias added to the posterior's logits (``-beta * delta + b``, a learned
   class prior; fitted with ``beta`` by class-balanced likelihood) in 2-fold cross-validation over
   random halves of the cells: does balanced accuracy rise over the best-class label?
2. Review flag: for candidate uncertainties (the shipped normalised entropy, the runner-up's margin,
   the UNet evaluations the adaptive procedure spent, the runner-up's paired t statistic), the
   fraction of cells that must be flagged for the rest to have at most 1 % error (the issue's target
   is at most 15 %), the area under the risk-coverage curve and the AUROC for errors.

Prints the confusion matrix too. ``--arrays`` keeps the scored errors (and reuses them if the file
exists), so both questions can be asked again without scoring.

    .venv/bin/python bench/val_posterior.py --per-class 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def class_offsets(deltas: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[float, np.ndarray]:
    """``beta`` and per-class offsets (class 0's fixed at 0) maximising the class-balanced likelihood."""
    from scipy.optimize import minimize

    from analysis.uncertainty import fit_beta

    weight = 1.0 / np.bincount(labels, minlength=n_classes)[labels]

    def nll(params: np.ndarray) -> float:
        logits = -np.exp(params[0]) * deltas + np.concatenate([[0.0], params[1:]])
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-(weight * logp[np.arange(len(labels)), labels]).sum() / weight.sum())

    start = np.concatenate([[np.log(fit_beta(deltas, labels))], np.zeros(n_classes - 1)])
    fitted = minimize(nll, start, method="Powell").x
    return float(np.exp(fitted[0])), np.concatenate([[0.0], fitted[1:]])


def runner_up_t(errors: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Smallest paired t statistic (log errors) of any other class against the best, per cell."""
    from analysis.classify import paired_t  # the adaptive procedure's own test statistic

    out = np.full(len(best), np.inf)
    log_e = np.log(errors)
    for i, b in enumerate(best):
        for c in range(errors.shape[1]):
            shared = ~np.isnan(log_e[i, c]) & ~np.isnan(log_e[i, b])
            if c == b or shared.sum() < 3:
                continue
            out[i] = min(out[i], float(paired_t(log_e[i, c, shared] - log_e[i, b, shared])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=ROOT / "analysis" / "weights",
                   help="folder with cytodiffusion.safetensors and calibration.json")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pbc")
    p.add_argument("--per-class", type=int, default=100, help="val cells per class")
    p.add_argument("--seed", type=int, default=7, help="cells and noise (calibration drew with 0)")
    p.add_argument("--splits", type=int, default=10, help="repetitions of the 2-fold split")
    p.add_argument("--target-error", type=float, default=0.01)
    p.add_argument("--arrays", type=Path, help="npz of the scored errors: read if it exists, else written")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from analysis.classes import CLASS_NAMES
    from analysis.classifier import DiffusionClassifier
    from analysis.classify import error_deltas, images_to_tensor, posterior, score_cells
    from analysis.training.evaluate import stratified_rows
    from analysis.training.pbc import load_images, read_split
    from analysis.uncertainty import (
        aurc,
        auroc,
        balanced_accuracy,
        entropy,
        fit_beta,
        review_threshold,
    )

    n_classes = len(CLASS_NAMES)
    if args.arrays and args.arrays.is_file():
        saved = np.load(args.arrays)
        errors, labels, error_scale = saved["errors"], saved["labels"], str(saved["error_scale"])
        print(f"{len(labels)} val cells read from {args.arrays}")
    else:
        torch.set_num_threads(args.threads)
        model = DiffusionClassifier(args.weights)
        data = load_images(args.data, stratified_rows(read_split(args.data, "val"), args.per_class,
                                                      args.seed), model.image_size)
        t0 = time.monotonic()
        scores = score_cells(model.unet, model.model_config, images_to_tensor(data.images),
                             model.config, torch.Generator("cpu").manual_seed(args.seed))
        errors, labels, error_scale = scores.errors, data.labels, scores.error_scale
        print(f"{len(labels)} val cells scored in {time.monotonic() - t0:.0f} s")
        if args.arrays:
            np.savez(args.arrays, errors=errors, labels=labels, error_scale=error_scale)
    deltas, best = error_deltas(errors, error_scale)
    correct = best == labels
    print(f"balanced accuracy {balanced_accuracy(labels, best, n_classes):.4f}, "
          f"accuracy {correct.mean():.4f}")
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, best), 1)
    print("confusion (rows: true class, columns: label)\n" + "\n".join(
        f"  {name:12s} " + " ".join(f"{n:4d}" for n in row) for name, row in zip(CLASS_NAMES, confusion)))

    rng = np.random.default_rng(args.seed)
    gains = []
    for _ in range(args.splits):
        order = rng.permutation(len(labels))
        halves = (order[: len(order) // 2], order[len(order) // 2:])
        for fit_on, test_on in (halves, halves[::-1]):
            beta, offsets = class_offsets(deltas[fit_on], labels[fit_on], n_classes)
            with_offsets = np.argmax(-beta * deltas[test_on] + offsets, axis=1)
            gains.append(balanced_accuracy(labels[test_on], with_offsets, n_classes)
                         - balanced_accuracy(labels[test_on], best[test_on], n_classes))
    _, offsets = class_offsets(deltas, labels, n_classes)
    print(f"class offsets, 2-fold cross-validation x {args.splits}: balanced accuracy "
          f"{np.mean(gains):+.4f} (sd {np.std(gains):.4f}); offsets fitted on all: "
          + ", ".join(f"{n} {o:+.2f}" for n, o in zip(CLASS_NAMES, offsets)))

    p_val = posterior(deltas, fit_beta(deltas, labels))
    margin = np.sort(deltas, axis=1)[:, 1]
    candidates = {"normalised entropy (shipped)": entropy(p_val),  # beta refitted on these cells
                  "minus the runner-up's margin": -margin,
                  "UNet evaluations spent": (~np.isnan(errors)).sum(axis=(1, 2)).astype(float),
                  "minus the runner-up's t": -runner_up_t(errors, best)}
    print(f"review flag: fraction flagged for <= {args.target_error:.0%} error among the rest, "
          "AURC, AUROC for errors")
    for name, u in candidates.items():
        flagged = np.mean(u > review_threshold(u, correct, args.target_error))
        print(f"  {name:30s} {flagged:.3f}  {aurc(u, correct):.4f}  "
              f"{auroc(u[~correct], u[correct]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
