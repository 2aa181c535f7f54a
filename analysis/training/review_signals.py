"""Collect what every candidate review signal is computed from, once per cell set.

The review rule (:mod:`analysis.review`) is chosen on val and scored on test; both
steps read the raw per-cell outputs of the two shipped models that this module
writes to one ``.npz`` per set:

``train``
    Reference features (pooled EfficientNet-Lite0, 1280-d) of the training cells of
    every lab (PBC at most ``--pbc-train-per-class`` per class): what the feature
    density is fitted on.
``train_small``
    A few training cells per lab with the diffusion errors as well: what the
    density over the per-timestep error statistics is fitted on.
``val`` / ``test``
    PBC (``--pbc-per-class`` a class, seed 0, as the per-lab evaluation draws them) and the
    other labs' whole split.
``aml``
    aml_dev (myeloblasts and neutrophils of another lab). The rule is chosen on
    its first half by :func:`aml_half` and scored on the second.

Each file holds ``labels`` (class index, ``-1`` for a myeloblast), ``lab`` (per cell),
``errors`` ``(N, C, T)`` (NaN where the adaptive classifier never evaluated a class),
``timesteps``, ``unet_evals``, ``ref_logits`` and ``ref_features`` (of the cell as it is) and,
but for ``train``, ``ref_logits_views8`` (the reference averaged over the 8 dihedral views).

Run (about 25 minutes on 2 cores)::

    .venv/bin/python -m analysis.training.review_signals --data ../shared/data --out .train/signals
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

from analysis.classifier import WEIGHTS_DIR, DiffusionClassifier, ReferenceClassifier
from analysis.classify import images_to_tensor, score_cells
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.training.labs import LABS, LabCells, concat, load_lab

#: aml_dev's class folders and the label each gets (``-1``: not one of the eight classes).
AML_FOLDERS = (("myeloblast_MYO", -1), ("neutrophil_segmented_NGS", 0))
BLAST = -1


def aml_half(paths: np.ndarray | list[str]) -> np.ndarray:
    """``True`` for the aml_dev cells of the half used to choose the rule (by a hash of the
    file name, fixed before any cell was scored); the other half is for scoring it."""
    return np.array([hashlib.sha256(Path(str(p)).name.encode()).digest()[0] % 2 == 0
                     for p in paths])


def aml_cells(data_root: Path, size: int) -> LabCells:
    """aml_dev's myeloblasts and neutrophils (one lab) framed at ``size``, labelled as
    :data:`AML_FOLDERS` says."""
    from analysis.framing import collect_image_paths
    from analysis.training.evaluate import load_folder

    parts = []
    for folder, label in AML_FOLDERS:
        path = data_root / "aml_dev" / folder
        images = load_folder(path, size)
        paths = tuple(str(p) for p in collect_image_paths([path]))
        parts.append(LabCells("aml", "dev", images, np.full(len(images), label, np.int64), paths))
    return concat(parts)


def load_set(data_root: Path, name: str, size: int, *, pbc_per_class: int,
             pbc_train_per_class: int, small_per_class: int) -> tuple[LabCells, np.ndarray]:
    """The cells of set ``name`` at ``size`` px and the lab of each cell."""
    if name == "aml":
        cells = aml_cells(data_root, size)
        return cells, np.array(["aml"] * len(cells))
    split = {"train": "train", "train_small": "train", "val": "val", "test": "test"}[name]
    parts = []
    for lab in LABS:
        cells = load_lab(data_root, lab, split, size, FIELD_OF_VIEW_UM)
        if name == "train_small":
            cells = cells.per_class(small_per_class if lab == "pbc" else max(1, small_per_class // 2), 1)
        elif lab == "pbc":
            cells = cells.per_class(pbc_train_per_class if name == "train" else pbc_per_class, 0)
        parts.append(cells)
    labs = np.concatenate([[p.lab] * len(p) for p in parts])
    return concat(parts), labs


def collect(data_root: Path, name: str, out: Path, *, weights_dir: Path, diffusion: bool,
            pbc_per_class: int, pbc_train_per_class: int, small_per_class: int,
            seed: int = 0) -> Path:
    reference = ReferenceClassifier(weights_dir)
    from analysis.reference import reference_logits

    kwargs = {"pbc_per_class": pbc_per_class, "pbc_train_per_class": pbc_train_per_class,
                  "small_per_class": small_per_class}
    cells, labs = load_set(data_root, name, reference.image_size, **kwargs)
    t0 = time.monotonic()
    logits, features = reference_logits(reference.model, cells.images, features=True)
    arrays: dict[str, np.ndarray] = {
        "labels": cells.labels, "lab": labs, "paths": np.array(cells.paths),
        "ref_logits": logits.astype(np.float32), "ref_features": features.astype(np.float32)}
    if name != "train":  # the reference averaged over every dihedral view (the rule may choose it)
        averaged, _ = reference_logits(reference.model, cells.images, views=8)
        arrays["ref_logits_views8"] = averaged.astype(np.float32)
    print(f"{name}: {len(cells)} cells, reference {time.monotonic() - t0:.0f} s",
          file=sys.stderr, flush=True)
    if diffusion:
        model = DiffusionClassifier(weights_dir)
        small, _ = load_set(data_root, name, model.image_size, **kwargs)
        if small.paths != cells.paths:
            raise RuntimeError("the two framings of a set must hold the same cells in one order")
        t0 = time.monotonic()
        errors, evals = [], []
        generator = torch.Generator("cpu").manual_seed(seed)
        for start in range(0, len(small), 64):
            scores = score_cells(model.unet, model.model_config,
                                 images_to_tensor(small.images[start:start + 64]), model.config,
                                 generator)
            errors.append(scores.errors)
            evals.append(scores.unet_evals)
            print(f"  {name}: {start + len(scores.errors)}/{len(small)} cells "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        arrays.update(errors=np.concatenate(errors).astype(np.float32),
                      timesteps=scores.timesteps, unet_evals=np.concatenate(evals),
                      error_scale=np.array(scores.error_scale))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--out", type=Path, default=Path(".train/signals"))
    p.add_argument("--sets", default="train,train_small,val,aml,test")
    p.add_argument("--pbc-per-class", type=int, default=180,
                   help="PBC val/test cells per class (180: nearly all of PBC's smallest classes; "
                        "they include the 48 of --pbc-per-class 48, the default before "
                        "2026-12-04's seventh session)")
    p.add_argument("--pbc-train-per-class", type=int, default=300)
    p.add_argument("--small-per-class", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the diffusion classifier's noise draws (another seed: another draw "
                        "of the same cells, to see how much a figure moves with it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in (s.strip() for s in args.sets.split(",") if s.strip()):
        path = collect(args.data, name, args.out, weights_dir=args.weights,
                       diffusion=name != "train", pbc_per_class=args.pbc_per_class,
                       pbc_train_per_class=args.pbc_train_per_class,
                       small_per_class=args.small_per_class, seed=args.seed)
        print(f"wrote {path}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
