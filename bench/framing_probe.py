"""Choose the field of view on val: a frozen ImageNet EfficientNet-Lite0 probe at each candidate.

For each field of view (micrometres) every lab's cells are framed the one way the node frames them
(:func:`analysis.framing.frame_at` through :mod:`analysis.training.labs`), the frozen pretrained
network's pooled features are computed, a softmax probe is fitted on the train cells of all three
labs (PBC at most ``--per-class`` a class) and scored on each lab's **val** cells. No test cell is
read. Prints one JSON line per field of view.

    .venv/bin/python bench/framing_probe.py --fov 22 26 30 36
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.reference import ReferenceConfig, build_reference, reference_logits
from analysis.training.labs import LABS, load_lab


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 300) -> torch.nn.Linear:
    """Class-balanced softmax regression on standardised features (L-BFGS, weight decay)."""
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    counts = torch.bincount(yt, minlength=n_classes).clamp(min=1).float()
    weight = (1.0 / counts) * len(yt) / n_classes
    probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(xt), yt, weight=weight)
        loss = loss + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--fov", type=float, nargs="+", default=[22.0, 26.0, 30.0, 36.0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--per-class", type=int, default=80, help="PBC train and val cells per class")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_reference(ReferenceConfig(image_size=args.size), pretrained=True)
    for fov in args.fov:
        t0 = time.monotonic()
        feats: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for lab in LABS:
            for split in ("train", "val"):
                cells = load_lab(args.data, lab, split, args.size, fov)
                if lab == "pbc":
                    cells = cells.per_class(args.per_class)
                _, f = reference_logits(model, cells.images, features=True)
                assert f is not None
                feats[(lab, split)] = (f, cells.labels)
        xtr = np.concatenate([feats[(lab, "train")][0] for lab in LABS])
        ytr = np.concatenate([feats[(lab, "train")][1] for lab in LABS])
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        probe = fit_probe((xtr - mu) / sd, ytr, 8)
        row: dict[str, object] = {"field_of_view_um": fov, "size": args.size}
        for lab in LABS:
            x, y = feats[(lab, "val")]
            with torch.no_grad():
                pred = probe(torch.from_numpy((x - mu) / sd).float()).argmax(1).numpy()
            present = np.unique(y)
            # Balanced accuracy over the classes the lab has (BCCD and Chula have five).
            row[f"{lab}_val_balanced_accuracy"] = round(float(np.mean(
                [np.mean(pred[y == c] == c) for c in present])), 4)
            row[f"{lab}_val_n"] = len(y)
        row["seconds"] = round(time.monotonic() - t0, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
