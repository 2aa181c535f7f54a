"""Figures of the model card and the docs: reliability diagram, risk-coverage curve, heatmap
examples, and the framing contact sheet.

``python -m analysis.training.plots --arrays eval.npz --out docs/model`` draws the first two
from the per-cell outputs written by ``cytonode evaluate --arrays-out eval.npz``;
``--heatmaps N`` adds N counterfactual heatmap examples of PBC test cells.
``docs/contact_sheet.png`` (:func:`make_contact_sheet`, see ``docs/detection.md``) shows slide
crops next to framed PBC images so a person can see that the framing matches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from analysis.uncertainty import entropy, reliability_table, risk_coverage

if TYPE_CHECKING:
    from analysis.crops import CropConfig


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
    from analysis.heatmap import counterfactual_heatmap, overlay_png
    from analysis.training.evaluate import stratified_rows
    from analysis.training.pbc import load_images, read_split

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


def contact_sheet(rows: Sequence[tuple[str, Sequence[NDArray[np.uint8]]]], path: Path,
                  tile: int = 128) -> Path:
    """Write a PNG with one labelled row of images per entry.

    Parameters
    ----------
    rows:
        ``(caption, images)`` pairs; images are resized to ``tile`` x ``tile``.
    path:
        PNG to write.
    tile:
        Side of each shown image.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    columns = max(len(images) for _, images in rows)
    caption_h = 18
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, len(rows) * (tile + caption_h + 6) + 4),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, images) in enumerate(rows):
        top = 4 + r * (tile + caption_h + 6)
        draw.text((6, top + 2), caption, fill=(0, 0, 0))
        for c, image in enumerate(images):
            im = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile, tile))
            sheet.paste(im, (4 + c * (tile + 4), top + caption_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def make_contact_sheet(slide_path: Path, pbc_dir: Path, out: Path, per_row: int = 8,
                       config: CropConfig | None = None) -> Path:
    """Write the contact sheet: crops from a slide above PBC images of the same size.

    Parameters
    ----------
    slide_path:
        A WSI DICOM series (file or folder).
    pbc_dir:
        The PBC folder (one sub-folder per class).
    out:
        PNG to write.
    per_row:
        Images per row.
    config:
        Crop framing (defaults if ``None``).

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from analysis.crops import CropConfig, iter_crops
    from analysis.detect import find_cells
    from analysis.framing import frame_at
    from analysis.tiles import Slide
    from analysis.training.pbc import PBC_FRAME_UM

    config = config or CropConfig()
    with Slide.open(slide_path) as slide:
        cells = find_cells(slide).cells
        crops = [crop for _, crop in iter_crops(slide, cells, config)]
    pbc: list[NDArray[np.uint8]] = []
    for cls in ("neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil", "ig",
                "neutrophil", "eosinophil"):
        files = sorted((pbc_dir / cls).glob("*.jpg"))
        if files:
            with Image.open(files[len(pbc) % len(files)]) as im:
                rgb = np.asarray(im.convert("RGB"))
            h, w = rgb.shape[:2]
            pbc.append(frame_at(rgb, (w / 2, h / 2), PBC_FRAME_UM / w, config.field_of_view_um,
                                config.output_size))
    rows: list[tuple[str, Sequence[NDArray[np.uint8]]]] = []
    for start in range(0, min(len(crops), 2 * per_row), per_row):
        caption = (f"slide crops (cytonode detect + crops), cells {start + 1}-"
                   f"{min(len(crops), start + per_row)}")
        rows.append((caption, crops[start:start + per_row]))
    rows.append((f"PBC training images framed the same way ({config.field_of_view_um:g} um)",
                 pbc[:per_row]))
    return contact_sheet(rows, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.training.plots", description=__doc__.splitlines()[0])
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
