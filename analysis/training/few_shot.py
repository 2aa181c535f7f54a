"""A site calibrated with a few labelled cells of its own, measured leave-one-lab-out.

Label-free adaptation (colour transfer, AdaBN, class-balanced AdaBN:
:mod:`analysis.training.adaptation`) has not brought a lab the reference never trained on
near the labs it did. A lab that validates an analyser already has its staff name a
differential on its own smears (CLSI H20-A2), so a few labelled cells per class are
available at installation. This module measures what they buy: the reference network,
trained without the held-out lab, stays frozen; only its last linear layer is refitted
(:func:`refit_head`) on the pooled features of

* the training labs' train cells (PBC thinned to ``--pbc-per-class`` per class), and
* ``k`` labelled cells per class drawn from the held-out lab's **train** split (all of a
  class when it has fewer),

the site's cells carrying ``--site-share`` of the weight, each class equally within each
part. The refitted head is scored on the held-out lab's **val + test** cells, which are
never drawn, beside the network unchanged on the same cells. Prints one JSON object.

    python -m analysis.training.few_shot --lab chula --reference .train/ms/ref_no_chula_base.safetensors
    python -m analysis.training.few_shot --lab bccd --reference .train/ms/ref_no_bccd_base.safetensors \\
        --k 5,10,20 --balanced-bn
    python -m analysis.training.few_shot --lab chula --reference .train/ms/ref_no_chula_base_s2.safetensors \\
        --pack .train/ms/pack_no_chula.safetensors --seed 2
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from analysis.framing import FIELD_OF_VIEW_UM
from analysis.site_adapt import SourcePack, balanced_adapt_batchnorm, fit_site_network, refit_beside
from analysis.training.evaluate_labs import metrics, print_result
from analysis.training.labs import LABS, LabCells, concat, load_lab, load_splits


def _features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    from analysis.reference import reference_logits

    _, feats = reference_logits(model, images, features=True)
    assert feats is not None
    return feats


def _score(head: torch.nn.Linear, features: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    from analysis.classifier import cnn_predictions

    with torch.no_grad():
        logits = head(torch.from_numpy(features)).double()
    p = torch.softmax(logits, dim=1).numpy()
    return metrics(cnn_predictions(p, {}), labels)


def run(data_root: Path, lab: str, reference: Path, *, ks: tuple[int, ...] = (10,),
        score_splits: str = "val+test", seed: int = 0, pbc_per_class: int = 200, site_share: float = 0.5,
        balanced_bn: bool = False, l2: float = 1e-2) -> dict[str, object]:
    """Score the network unchanged and with its head refitted on ``k`` site cells per class."""
    from analysis.reference import load_reference

    model, config, metadata = load_reference(reference)
    size = config.image_size
    trained_on = [x for x in metadata.get("labs", "").split(",") if x in LABS and x != lab]
    if not trained_on:
        raise ValueError(f"{reference} names no training lab other than {lab}")
    source = concat([load_lab(data_root, x, "train", size, FIELD_OF_VIEW_UM).per_class(
        pbc_per_class, seed) if x == "pbc" else load_lab(data_root, x, "train", size, FIELD_OF_VIEW_UM)
        for x in trained_on])
    site_train: LabCells = load_lab(data_root, lab, "train", size, FIELD_OF_VIEW_UM)
    scored = load_splits(data_root, lab, score_splits, size, FIELD_OF_VIEW_UM)
    out: dict[str, object] = {"lab": lab, "reference": str(reference),
                              "trained_on": ",".join(trained_on),
                              "scored_on": f"{lab} {score_splits}",
                              "cells": len(scored), "site_share": site_share, "l2": l2}
    variants = {"frozen": model}
    if balanced_bn:
        adapted = copy.deepcopy(model)  # adapted on the site's unlabelled train+val+test cells
        balanced_adapt_batchnorm(adapted, np.concatenate([site_train.images, scored.images]),
                                 seed=seed)
        variants["balanced-bn"] = adapted
    position = {path: i for i, path in enumerate(site_train.paths)}
    for name, net in variants.items():
        f_source, f_site, f_scored = (_features(net, c.images) for c in (source, site_train, scored))
        rows: dict[str, object] = {"unchanged": _score(net._fc, f_scored, scored.labels)}
        for k in ks:
            shot = site_train.per_class(k, seed)
            idx = np.array([position[path] for path in shot.paths])
            head = refit_beside(net._fc, f_source, source.labels, f_site[idx], shot.labels,
                                site_share=site_share, l2=l2)
            rows[f"k={k}"] = {"site_cells": len(shot), **_score(head, f_scored, scored.labels)}
            print(f"{lab} {name} k={k}: {rows[f'k={k}']['balanced_accuracy']} "
                  f"(unchanged {rows['unchanged']['balanced_accuracy']})", file=sys.stderr)
        out[name] = rows
    return out


def run_site_network(data_root: Path, lab: str, reference: Path, pack_path: Path, *,
                     ks: tuple[int, ...] = (10,), score_splits: str = "val+test",
                     adapt_splits: str = "train+val+test", seed: int = 0) -> dict[str, object]:
    """What the node's ``calibrate-site --labelled`` does (:func:`analysis.site_adapt.fit_site_network`):
    class-balanced AdaBN on the site's ``adapt_splits`` cells (labels unread), the last layer
    refitted on ``k`` labelled train cells per class beside the shipped-size ``pack``."""
    from analysis.reference import load_reference

    model, config, metadata = load_reference(reference)
    size = config.image_size
    pack = SourcePack.load(pack_path)
    trained_on = set(metadata.get("labs", "").split(","))
    if not set(pack.labs) <= trained_on:
        raise ValueError(f"{pack_path} must hold cells of {reference}'s training labs "
                         f"({', '.join(sorted(trained_on))}), not {sorted(set(pack.labs))}")
    site_train: LabCells = load_lab(data_root, lab, "train", size, FIELD_OF_VIEW_UM)
    scored = load_splits(data_root, lab, score_splits, size, FIELD_OF_VIEW_UM)
    adapt = load_splits(data_root, lab, adapt_splits, size, FIELD_OF_VIEW_UM)
    rows: dict[str, object] = {"unchanged": _score(model._fc, _features(model, scored.images),
                                                   scored.labels)}
    for k in ks:
        shot = site_train.per_class(k, seed)
        drawn = set(shot.paths)
        rest = adapt.images[[i for i, path in enumerate(adapt.paths) if path not in drawn]]
        fitted = fit_site_network(model, rest, shot.images, shot.labels, pack, seed=seed)
        net = fitted.model
        row = {"site_cells": len(shot), "adapted_on": len(rest) + len(shot),
               **_score(net._fc, _features(net, scored.images), scored.labels)}
        # H: the gate's choice (the site network only where cross-validation on the labelled
        # cells says it beats the shipped one)
        row["gate"] = {"used": fitted.used, "shipped_cv": fitted.shipped_accuracy,
                       "site_cv": fitted.site_accuracy,
                       "balanced_accuracy": row["balanced_accuracy"] if fitted.used
                       else rows["unchanged"]["balanced_accuracy"]}  # type: ignore[index]
        rows[f"k={k}"] = row
        print(f"{lab} site network k={k}: {row['balanced_accuracy']} (unchanged "
              f"{rows['unchanged']['balanced_accuracy']}; gate {row['gate']})",  # type: ignore[index]
              file=sys.stderr)
    return {"lab": lab, "reference": str(reference), "pack": str(pack_path),
            "scored_on": f"{lab} {score_splits}", "adapted_on": f"{lab} {adapt_splits}",
            "cells": len(scored), "seed": seed, "site network": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--lab", choices=LABS, required=True,
                   help="the site's lab (held out of the reference's training, or one it trained "
                        "on: what refitting does where there is no shift)")
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--k", default="10", help="labelled site cells per class, comma-separated")
    p.add_argument("--score-splits", default="val+test",
                   help="the site's splits scored ('+'-joined; never 'train', whence the labelled cells)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site-share", type=float, default=0.5)
    p.add_argument("--pack", type=Path,
                   help="measure the node's site network instead (site_adapt.fit_site_network) with "
                        "this source pack (analysis.training.site_pack)")
    p.add_argument("--adapt-splits", default="train+val+test",
                   help="with --pack: the site's splits whose cells (labels unread) adapt the statistics")
    p.add_argument("--balanced-bn", action="store_true",
                   help="also refit after class-balanced AdaBN on the site's unlabelled cells")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        ks = tuple(int(v) for v in args.k.split(","))
    except ValueError:
        p.error(f"--k takes whole numbers joined with ',', not {args.k!r}")
    if not ks or min(ks) < 1:
        p.error("--k must be at least 1")
    if any(x not in ("val", "test") for x in args.score_splits.split("+")):
        p.error(f"--score-splits are val and test joined with '+', not {args.score_splits!r}")
    if not 0.0 < args.site_share < 1.0:
        p.error("--site-share must lie in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pack:
        result = run_site_network(args.data, args.lab, args.reference, args.pack, ks=ks,
                                  score_splits=args.score_splits, adapt_splits=args.adapt_splits,
                                  seed=args.seed)
    else:
        result = run(args.data, args.lab, args.reference, ks=ks, score_splits=args.score_splits,
                     seed=args.seed, site_share=args.site_share, balanced_bn=args.balanced_bn)
    print_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
