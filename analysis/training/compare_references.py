"""Score reference checkpoints side by side on the labs' splits (a recipe comparison).

For leave-one-lab-out recipe choices: a reference trained without a lab may be scored on that
lab's ``train`` and ``val`` cells (none of which it trained on), many more cells than its val
alone, while the lab's ``test`` stays for reporting. PBC is thinned to ``--pbc-per-class``.
Prints one JSON line per checkpoint: balanced accuracy, accuracy and recalls per lab and split.

Probes of what a lab's cells differ in: ``--blur`` also scores every set Gaussian-blurred (sigma
in the network's input pixels: focus), ``--fov-scale`` framed with the field of view scaled
(what a pixel spacing off by that factor does to the framing).

    python -m analysis.training.compare_references .train/ms/ref_no_chula_base.safetensors \\
        .train/ms/ref_no_chula_wb.safetensors --labs chula --splits train+val,test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from analysis.framing import FIELD_OF_VIEW_UM
from analysis.reference import load_reference, reference_logits
from analysis.training.evaluate_labs import class_metrics
from analysis.training.labs import LABS, SPLITS, LabCells, load_splits


def _cells(data: Path, lab: str, splits: str, size: int, pbc_per_class: int,
           fov_scale: float = 1.0) -> LabCells:
    for split in splits.split("+"):
        if split not in SPLITS:
            raise SystemExit(f"unknown split {split!r}: the splits are {', '.join(SPLITS)}")
    cells = load_splits(data, lab, splits, size, FIELD_OF_VIEW_UM * fov_scale)
    return cells.per_class(pbc_per_class, 0) if lab == "pbc" and pbc_per_class else cells


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 images, each Gaussian-blurred by ``sigma`` pixels (0: as they are)."""
    if sigma <= 0:
        return images
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(sigma)))
                     for im in images])


def _floats(text: str, name: str, *, zero: bool) -> list[float]:
    """The comma-separated numbers of option ``name``: >= 0 if ``zero``, else > 0."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name} takes comma-separated numbers, not {text!r}") from None
    if not values or any(v < 0 or (v == 0 and not zero) for v in values):
        raise SystemExit(f"{name} takes one or more numbers {'>=' if zero else '>'} 0, "
                         f"not {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("references", type=Path, nargs="+", help="reference .safetensors files")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--labs", default=",".join(LABS))
    p.add_argument("--splits", default="val,test",
                   help="comma-separated; join splits with + to score them as one set")
    p.add_argument("--pbc-per-class", type=int, default=48)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--blur", default="0",
                   help="comma-separated Gaussian blur sigmas in input pixels (0: none)")
    p.add_argument("--fov-scale", default="1",
                   help="comma-separated factors on the field of view the cells are framed at")
    args = p.parse_args(argv)
    blurs = _floats(args.blur, "--blur", zero=True)
    fov_scales = _floats(args.fov_scale, "--fov-scale", zero=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache: dict[tuple[str, str, int, float], LabCells] = {}
    views: dict[tuple[str, str, int, float, float], np.ndarray] = {}  # blurred once, for every reference
    for path in args.references:
        model, config, _ = load_reference(path)
        scores = {}
        for lab in (x.strip() for x in args.labs.split(",") if x.strip()):
            for splits in (x.strip() for x in args.splits.split(",") if x.strip()):
                for fov in fov_scales:
                    key = (lab, splits, config.image_size, fov)
                    if key not in cache:
                        cache[key] = _cells(args.data, lab, splits, config.image_size,
                                            args.pbc_per_class, fov)
                    cells = cache[key]
                    for sigma in blurs:
                        if (*key, sigma) not in views:
                            views[(*key, sigma)] = blurred(cells.images, sigma)
                        logits, _ = reference_logits(model, views[(*key, sigma)])
                        name = (f"{lab} {splits}" + (f" blur {sigma:g}" if sigma else "")
                                + (f" fov x{fov:g}" if fov != 1 else ""))
                        scores[name] = class_metrics(logits.argmax(axis=1), cells.labels)
        json.dump({"reference": str(path), "scores": scores}, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
