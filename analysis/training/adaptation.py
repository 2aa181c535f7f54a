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
    unlabelled cells (AdaBN; :func:`analysis.training.adapt.adapt_batchnorm`);
``colour+bn``
    both.

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
import json
import sys
import time
from pathlib import Path

import torch

from analysis.framing import FIELD_OF_VIEW_UM
from analysis.training.adapt import ColourTransfer, adapt_batchnorm
from analysis.training.evaluate_labs import metrics
from analysis.training.labs import LABS, SPLITS, LabCells, concat, load_lab


def _source_cells(data_root: Path, lab: str, size: int, pbc_per_class: int, seed: int):
    """The training labs' val cells (the colour transfer's target), PBC thinned per class."""
    parts = []
    for other in LABS:
        if other == lab:
            continue
        cells = load_lab(data_root, other, "val", size, FIELD_OF_VIEW_UM)
        parts.append(cells.per_class(pbc_per_class, seed) if other == "pbc" else cells)
    return concat(parts)


def _splits(data_root: Path, lab: str, splits: str, size: int) -> LabCells:
    """``lab``'s cells of the '+'-joined ``splits`` (``"train+val"``) as one set."""
    return concat([load_lab(data_root, lab, split, size, FIELD_OF_VIEW_UM)
                   for split in splits.split("+")])


def run(data_root: Path, lab: str, *, reference: Path | None, diffusion: Path | None,
        pbc_per_class: int = 48, seed: int = 0, site_splits: str = "val",
        score_splits: str = "test") -> dict[str, object]:
    from analysis.classifier import DiffusionClassifier, ReferenceClassifier

    out: dict[str, object] = {"lab": lab, "adapted_on": f"{lab} {site_splits} (unlabelled)",
                              "scored_on": f"{lab} {score_splits}"}
    if reference is not None:
        from analysis.reference import load_reference

        model, config, _ = load_reference(reference)
        size = config.image_size
        site = _splits(data_root, lab, site_splits, size)
        test = _splits(data_root, lab, score_splits, size)
        source = _source_cells(data_root, lab, size, pbc_per_class, seed)
        transfer = ColourTransfer.fit(site.images, source.images)
        ref = ReferenceClassifier.__new__(ReferenceClassifier)
        ref.config, ref.metadata, ref.calibration, ref.views = config, {}, {}, 1
        rows = {}
        for name in ("none", "colour", "bn", "colour+bn"):
            ref.model = copy.deepcopy(model)
            site_images = transfer.apply(site.images) if "colour" in name else site.images
            test_images = transfer.apply(test.images) if "colour" in name else test.images
            if "bn" in name:
                adapt_batchnorm(ref.model, site_images)
            rows[name] = metrics(ref.predict(test_images), test.labels)
            print(f"reference {lab} {name}: {rows[name]['balanced_accuracy']}", file=sys.stderr)
        out["reference"] = {"weights": str(reference), **rows}
    if diffusion is not None:
        model = DiffusionClassifier(diffusion)
        size = model.image_size
        site = _splits(data_root, lab, site_splits, size)
        test = _splits(data_root, lab, score_splits, size)
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
    p.add_argument("--lab", choices=[x for x in LABS if x != "pbc"], required=True,
                   help="the held-out lab")
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
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
