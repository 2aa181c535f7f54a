"""Test-time adaptation to a new lab, measured leave-one-lab-out.

A model trained without a lab is scored on that lab's test cells four ways:

``none``
    as shipped;
``colour``
    the lab's colours mapped onto the training labs' before classification (Reinhard's
    transfer in CIELAB: each channel's mean and spread over the site's unlabelled cells
    moved to those of the training cells; :class:`analysis.training.adapt.ColourTransfer`);
``bn``
    (the reference only) its batch-normalisation statistics re-estimated on the site's
    unlabelled cells (AdaBN; :func:`analysis.site_adapt.adapt_batchnorm`);
``colour+bn``
    both;
``balanced-bn``
    (the reference only) AdaBN on the site's cells re-sampled so that each class the network
    predicts weighs the same (:func:`analysis.site_adapt.balanced_adapt_batchnorm`).

The site's unlabelled cells are by default the held-out lab's **val** split (labels never
read), and its test split is scored; ``--site-splits`` and ``--score-splits`` choose others
(``train+val`` for both: a site calibrated on the cells it reports, as a lab calibrates on
its own smears). Prints one JSON object.

    python -m analysis.training.adaptation --lab chula --reference .train/ref_no_chula.safetensors
    python -m analysis.training.adaptation --lab bccd --diffusion .train/diff_no_bccd
    python -m analysis.training.adaptation --lab chula --reference .train/ms/ref_no_chula_strong.safetensors \\
        --site-splits train+val --score-splits train+val
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from analysis.framing import FIELD_OF_VIEW_UM
from analysis.site_adapt import adapt_batchnorm, balanced_adapt_batchnorm
from analysis.training.adapt import ColourTransfer
from analysis.training.evaluate_labs import metrics, print_result
from analysis.training.labs import LABS, SPLITS, LabCells, concat, load_lab, load_splits


def _source_cells(data_root: Path, lab: str, size: int, pbc_per_class: int, seed: int):
    """The training labs' val cells (the colour transfer's target), PBC thinned per class."""
    parts = []
    for other in LABS:
        if other == lab:
            continue
        cells = load_lab(data_root, other, "val", size, FIELD_OF_VIEW_UM)
        parts.append(cells.per_class(pbc_per_class, seed) if other == "pbc" else cells)
    return concat(parts)


def _site_and_scored(data_root: Path, lab: str, site_splits: str, score_splits: str,
                     size: int) -> tuple[LabCells, LabCells]:
    """The site's cells and the scored ones (loaded once when they are the same splits)."""
    site = load_splits(data_root, lab, site_splits, size, FIELD_OF_VIEW_UM)
    if score_splits == site_splits:
        return site, site
    return site, load_splits(data_root, lab, score_splits, size, FIELD_OF_VIEW_UM)


def run(data_root: Path, lab: str, *, reference: Path | None, diffusion: Path | None,
        pbc_per_class: int = 48, seed: int = 0, site_splits: str = "val",
        score_splits: str = "test") -> dict[str, object]:
    from analysis.classifier import DiffusionClassifier, cnn_predictions

    out: dict[str, object] = {"lab": lab, "adapted_on": f"{lab} {site_splits} (unlabelled)",
                              "scored_on": f"{lab} {score_splits}"}
    if reference is not None:
        from analysis.reference import load_reference, reference_logits, reference_posterior

        model, config, _ = load_reference(reference)
        site, test = _site_and_scored(data_root, lab, site_splits, score_splits, config.image_size)
        source = _source_cells(data_root, lab, config.image_size, pbc_per_class, seed)
        transfer = ColourTransfer.fit(site.images, source.images)
        images = {False: (site.images, test.images),  # with the colour transfer or without
                  True: (transfer.apply(site.images), transfer.apply(test.images))}
        rows = {}
        for name in ("none", "colour", "bn", "colour+bn", "balanced-bn"):
            adapted = copy.deepcopy(model)
            site_images, test_images = images["colour" in name]
            if name == "balanced-bn":
                balanced_adapt_batchnorm(adapted, site_images, seed=seed)
            elif "bn" in name:
                adapt_batchnorm(adapted, site_images)
            p = reference_posterior(reference_logits(adapted, test_images)[0])
            rows[name] = metrics(cnn_predictions(p, {}), test.labels)
            print(f"reference {lab} {name}: {rows[name]['balanced_accuracy']}", file=sys.stderr)
        out["reference"] = {"weights": str(reference), **rows}
    if diffusion is not None:
        model = DiffusionClassifier(diffusion)
        size = model.image_size
        site, test = _site_and_scored(data_root, lab, site_splits, score_splits, size)
        source = _source_cells(data_root, lab, size, pbc_per_class, seed)
        transfer = ColourTransfer.fit(site.images, source.images)
        rows = {}
        for name in ("none", "colour"):
            t0 = time.monotonic()
            images = transfer.apply(test.images) if name == "colour" else test.images
            pred = model.predict(images, torch.Generator("cpu").manual_seed(seed))
            rows[name] = metrics(pred, test.labels)
            rows[name]["seconds"] = round(time.monotonic() - t0, 1)
            print(f"diffusion {lab} {name}: {rows[name]['balanced_accuracy']}", file=sys.stderr)
        out["diffusion"] = {"weights": str(diffusion), **rows}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--lab", choices=LABS, required=True,
                   help="the held-out lab (or a lab the model trained on: what adapting does "
                        "where there is no shift)")
    p.add_argument("--reference", type=Path, help="reference weights trained without --lab")
    p.add_argument("--diffusion", type=Path,
                   help="folder with diffusion weights trained without --lab and calibration.json")
    p.add_argument("--site-splits", default="val",
                   help="the held-out lab's splits whose unlabelled cells adapt ('+'-joined)")
    p.add_argument("--score-splits", default="test",
                   help="the held-out lab's splits scored ('+'-joined; the same as --site-splits "
                        "for a site calibrated on the cells it reports)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.reference is None and args.diffusion is None:
        p.error("give --reference, --diffusion or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    for splits in (args.site_splits, args.score_splits):
        if not splits or any(x not in SPLITS for x in splits.split("+")):
            p.error(f"splits are {', '.join(SPLITS)} joined with '+', not {splits!r}")
    result = run(args.data, args.lab, reference=args.reference, diffusion=args.diffusion,
                 site_splits=args.site_splits, score_splits=args.score_splits)
    print_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
