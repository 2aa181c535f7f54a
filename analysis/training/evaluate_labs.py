"""Every lab's split scored by both models: the diffusion classifier and the EfficientNet reference.

For each lab (:mod:`analysis.training.labs`) the cells of one split are framed the one way, the
diffusion classifier (adaptive, with its calibration) and the fine-tuned reference classify them,
and the metrics a user would look at are reported per lab: balanced accuracy over the classes
the lab has, accuracy, recall per class, the share flagged for review and the error among the
cells not flagged (each model's own thresholds). With both models also ``combined``: the class
the node reports, from the combined posterior (:func:`analysis.review.combine`, with the
calibration's ``diffusion_weight`` or ``--diffusion-weight``). With ``--aml`` also aml_dev (another lab, never trained on): neutrophil
accuracy and the blast AUROC of each model's anomaly signal against same-lab neutrophils.
Prints one JSON object; ``--out`` also writes it.

    python -m analysis.training.evaluate_labs --split test --threads 2
    python -m analysis.training.evaluate_labs --split test --labs chula --weights DIR
    python -m analysis.training.evaluate_labs --split test --labs bccd,chula --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from analysis.classes import CLASS_NAMES
from analysis.classifier import (
    WEIGHTS_DIR,
    DiffusionClassifier,
    Predictions,
    ReferenceClassifier,
)
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.review import ReviewRule, combine
from analysis.training.labs import LABS, LabCells, load_lab
from analysis.uncertainty import auroc, balanced_accuracy, per_class_recall

AML_BLASTS = "myeloblast_MYO"
AML_NEUTROPHILS = "neutrophil_segmented_NGS"


def class_metrics(label: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Cells, balanced accuracy over the classes present, accuracy and recalls of calls ``label``."""
    recall = per_class_recall(labels, label, len(CLASS_NAMES))
    return {
        "cells": len(labels),
        "balanced_accuracy": round(balanced_accuracy(labels, label, len(CLASS_NAMES)), 4),
        "accuracy": round(float(np.mean(label == labels)), 4) if len(labels) else None,
        "recall": {name: round(float(r), 3) for name, r in zip(CLASS_NAMES, recall)
                   if not np.isnan(r)},
    }


def metrics(pred: Predictions, labels: np.ndarray) -> dict[str, object]:
    """:func:`class_metrics`, the share flagged for review and the error among the rest."""
    correct = pred.label == labels
    kept = ~pred.review
    return {
        **class_metrics(pred.label, labels),
        "flagged_for_review": round(float(pred.review.mean()), 4) if len(labels) else None,
        "error_among_not_flagged": (round(float(1 - correct[kept].mean()), 4)
                                    if kept.any() else None),
        "predicted": {name: int(np.sum(pred.label == c)) for c, name in enumerate(CLASS_NAMES)
                      if np.any(pred.label == c)},
    }


def _predict(model: DiffusionClassifier | ReferenceClassifier, cells: LabCells,
             seed: int) -> Predictions:
    if isinstance(model, DiffusionClassifier):
        return model.predict(cells.images, torch.Generator("cpu").manual_seed(seed))
    return model.predict(cells.images)


def _aml(aml_dir: Path, size: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    from analysis.training.evaluate import load_folder

    return (load_folder(aml_dir / AML_BLASTS, size, limit),
            load_folder(aml_dir / AML_NEUTROPHILS, size, limit))


def evaluate_labs(weights_dir: Path, data_root: Path, split: str, labs: tuple[str, ...], *,
                  pbc_per_class: int = 0, seed: int = 0, models: tuple[str, ...] = (
                      "diffusion", "reference"), aml_dir: Path | None = None,
                  aml_limit: int = 0, diffusion_weight: float | None = None) -> dict[str, object]:
    """Score ``split`` of every lab in ``labs`` with each of ``models``; see the module doc."""
    loaded: dict[str, DiffusionClassifier | ReferenceClassifier] = {}
    if "diffusion" in models:
        loaded["diffusion"] = DiffusionClassifier(weights_dir)
    if "reference" in models:
        loaded["reference"] = ReferenceClassifier(weights_dir)
    out: dict[str, object] = {"split": split, "field_of_view_um": FIELD_OF_VIEW_UM,
                              "weights": str(weights_dir)}
    kept: dict[tuple[str, str], tuple[Predictions, np.ndarray]] = {}
    for name, model in loaded.items():
        per_lab: dict[str, object] = {}
        for lab in labs:
            t0 = time.monotonic()
            cells = load_lab(data_root, lab, split, model.image_size, FIELD_OF_VIEW_UM)
            if lab == "pbc" and pbc_per_class > 0:
                cells = cells.per_class(pbc_per_class, seed)
            pred = _predict(model, cells, seed)
            kept[name, lab] = pred, cells.labels
            row = metrics(pred, cells.labels)
            row["seconds"] = round(time.monotonic() - t0, 1)
            per_lab[lab] = row
            print(f"{name} {lab} {split}: balanced accuracy {row['balanced_accuracy']} on "
                  f"{row['cells']} cells ({row['seconds']} s)", file=sys.stderr, flush=True)
        if aml_dir is not None:
            blasts, neutrophils = _aml(aml_dir, model.image_size, aml_limit)
            pb = _predict(model, LabCells("aml", "all", blasts, np.zeros(len(blasts), np.int64),
                                          ()), seed)
            pn = _predict(model, LabCells("aml", "all", neutrophils,
                                          np.zeros(len(neutrophils), np.int64), ()), seed)
            per_lab["aml_dev"] = {
                "neutrophils": len(neutrophils), "myeloblasts": len(blasts),
                "neutrophil_accuracy": round(float(np.mean(pn.label == 0)), 4),
                "blast_auroc_vs_aml_neutrophils": round(auroc(pb.anomaly_score,
                                                              pn.anomaly_score), 4),
                "blasts_flagged": round(float(np.mean(pb.review | pb.abnormal)), 4),
                "neutrophils_flagged": round(float(np.mean(pn.review | pn.abnormal)), 4),
                "blasts_predicted": {n: int(np.sum(pb.label == c))
                                     for c, n in enumerate(CLASS_NAMES) if np.any(pb.label == c)},
            }
        out[name] = per_lab
    if "diffusion" in loaded and "reference" in loaded:
        w = diffusion_weight
        if w is None:  # the calibration's review rule (the weight the node reports with)
            model = loaded["diffusion"]
            assert isinstance(model, DiffusionClassifier)
            raw = model.calibration.get("review_rule")
            w = ReviewRule.from_dict(raw).diffusion_weight if isinstance(raw, dict) else 1.0
        combined: dict[str, object] = {"diffusion_weight": w}
        for lab in labs:
            (pd, y), (pr, y_ref) = kept["diffusion", lab], kept["reference", lab]
            if not np.array_equal(y, y_ref):
                raise RuntimeError(f"{lab}: the two models were given different cells")
            row = class_metrics(combine(pd.probabilities, pr.probabilities, w).argmax(axis=1), y)
            combined[lab] = row
            print(f"combined {lab} {split}: balanced accuracy {row['balanced_accuracy']}",
                  file=sys.stderr, flush=True)
        out["combined"] = combined
    return out


def spread(runs: dict[int, dict[str, object]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, lowest and highest balanced accuracy and accuracy of each model on each lab over
    runs with different noise draws (``{seed: evaluate_labs(...)}``): on a lab of 70 cells one
    cell of a small class moves balanced accuracy by several points, so one draw is not a figure."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    first = next(iter(runs.values()))
    for model in ("diffusion", "reference", "combined"):
        if model not in first:
            continue
        per_lab: dict[str, dict[str, float]] = {}
        for lab, row in first[model].items():  # type: ignore[attr-defined]
            if not isinstance(row, dict) or "balanced_accuracy" not in row:
                continue
            stats: dict[str, float] = {}
            for key in ("balanced_accuracy", "accuracy"):
                values = np.array([float(r[model][lab][key]) for r in runs.values()])  # type: ignore[index]
                stats |= {f"{key}_mean": round(float(values.mean()), 4),
                          f"{key}_min": round(float(values.min()), 4),
                          f"{key}_max": round(float(values.max()), 4)}
            per_lab[lab] = stats
        out[model] = per_lab
    return out


def print_result(result: object, out: Path | None) -> None:
    """Print a command's result as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                   help="folder with cytodiffusion.safetensors, reference_effnet.safetensors "
                        "and calibration.json")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--labs", default=",".join(LABS))
    p.add_argument("--models", default="diffusion,reference")
    p.add_argument("--pbc-per-class", type=int, default=0, help="PBC cells per class (0: all)")
    p.add_argument("--aml", type=Path, default=None, help="the aml_dev folder (optional)")
    p.add_argument("--aml-limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="",
                   help="comma-separated seeds: score once per seed (noise draws and the PBC "
                        "subset) and report each run and the spread (overrides --seed)")
    p.add_argument("--diffusion-weight", type=float, default=None,
                   help="weight of the diffusion posterior in the combined one (default: the "
                        "calibration's review rule)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    labs = tuple(x.strip() for x in args.labs.split(",") if x.strip())
    models = tuple(x.strip() for x in args.models.split(",") if x.strip())
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [args.seed]
    runs = {seed: evaluate_labs(args.weights, args.data, args.split, labs,
                                pbc_per_class=args.pbc_per_class, seed=seed, models=models,
                                aml_dir=args.aml, aml_limit=args.aml_limit,
                                diffusion_weight=args.diffusion_weight) for seed in seeds}
    result: dict[str, object] = (runs[seeds[0]] if len(seeds) == 1 else
                                 {"seeds": seeds, "spread": spread(runs),
                                  "runs": {str(k): v for k, v in runs.items()}})
    print_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
