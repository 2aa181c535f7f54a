"""Figures of the model card: reliability diagram, risk-coverage curve, heatmap examples.

``python -m analysis.plots --arrays eval.npz --out docs/model`` draws the first two
from the per-cell outputs written by ``cytonode evaluate --arrays-out eval.npz``;
``--heatmaps N`` adds N counterfactual heatmap examples of PBC test cells.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from analysis.uncertainty import entropy, reliability_table, risk_coverage


def reliability_png(models: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, for each model."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for name, (p, labels) in models.items():
        rows = [r for r in reliability_table(p, labels) if r["count"] > 0]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                label=f"{name} (n={len(labels)})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability, PBC test")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def risk_coverage_png(models: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Selective risk against coverage (most certain cells accepted first)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (u, correct) in models.items():
        cov, risk = risk_coverage(u, correct)
        ax.plot(cov, risk, label=f"{name} (AURC {risk.mean():.3f})")
    ax.axhline(0.01, color="grey", lw=1, ls="--", label="1% target")
    ax.set_xlabel("coverage (fraction of cells accepted)")
    ax.set_ylabel("error among accepted cells")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Risk-coverage, PBC test")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap_examples(weights_dir: Path, data_dir: Path, out_dir: Path, n: int, seed: int) -> list[Path]:
    """Counterfactual heatmaps (predicted vs runner-up) of ``n`` PBC test cells, one per class."""
    import torch

    from analysis.classes import CLASS_NAMES
    from analysis.classifier import DiffusionClassifier
    from analysis.evaluate import stratified_rows
    from analysis.heatmap import counterfactual_heatmap, overlay_png
    from analysis.pbc import load_images, read_split

    model = DiffusionClassifier(weights_dir)
    rows = stratified_rows(read_split(data_dir, "test"), 1, seed)[:n]
    data = load_images(data_dir, rows, model.image_size)
    generator = torch.Generator("cpu").manual_seed(seed)
    pred = model.predict(data.images, generator)
    written = []
    x = (torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 127.5) - 1.0
    for i in range(len(rows)):
        order = np.argsort(-pred.probabilities[i])
        top, runner = int(order[0]), int(order[1])
        heat = counterfactual_heatmap(model.unet, model.model_config, x[i], top, runner,
                                      model.config, generator)
        name = (f"heatmap_{i}_true-{CLASS_NAMES[data.labels[i]]}_pred-{CLASS_NAMES[top]}"
                f"_vs-{CLASS_NAMES[runner]}.png")
        overlay_png(data.images[i], heat, out_dir / name, scale=4)
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.plots", description=__doc__.splitlines()[0])
    p.add_argument("--arrays", type=Path, help="npz from `cytonode evaluate --arrays-out`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heatmaps", type=int, default=0, help="heatmap examples to draw")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--data", type=Path, default=Path("../shared/data/pbc"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.arrays:
        a = np.load(args.arrays)
        d_p, labels, c_p, c_labels = a["d_prob"], a["labels"], a["c_prob"], a["c_labels"]
        reliability_png({"diffusion": (d_p, labels), "CNN": (c_p, c_labels)},
                        args.out / "reliability.png")
        risk_coverage_png({"diffusion (entropy)": (entropy(d_p), d_p.argmax(1) == labels),
                           "CNN (1 - max softmax)": (1 - c_p.max(1), c_p.argmax(1) == c_labels)},
                          args.out / "risk_coverage.png")
    if args.heatmaps:
        from analysis.classifier import WEIGHTS_DIR

        for path in heatmap_examples(args.weights or WEIGHTS_DIR, args.data, args.out,
                                     args.heatmaps, args.seed):
            sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
