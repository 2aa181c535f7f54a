"""Can the node read a site at all? The unsure-cell count, measured (model card, thirteenth session).

A cell is *unsure* when the review rule flags it as uncertain or as the models disagreeing. A site
whose cells are unsure far more often than any validated lab's (one-sided binomial against the
rule's ``site_unsure_share``, p < 0.01) is one the node cannot read
(:attr:`analysis.site.SiteCalibration.too_many_unsure`). This module measures that claim:

``posteriors``
    Both models' posteriors of a weights folder trained without ``--lab`` on every split of
    that lab and on the val split of the labs it trained on (PBC 48 a class), into one ``.npz``.
``held-out``
    Only the held-out labs' cases of ``score``, from ``posteriors``' files (no signals folder).
``score``
    The criterion's cases (``analysis/training/criteria.txt``, 17:30): the known labs' test
    normal cells and aml_dev's second-half neutrophils as sites (the shipped models, from a
    ``review_signals`` folder), the held-out labs' train cells (from ``posteriors``' files), and
    PBC's test normal cells in a stain no lab used (the shipped models, run here). For each: the
    unsure share, the binomial p, whether it is marked and the reported class's balanced
    accuracy on the same cells. ``--slides`` also scores the per-slide variant (17:10, not
    shipped).

    python -m analysis.training.site_readable posteriors --lab chula \\
        --weights .train/lolo_site/no_chula/w --out .train/s13/lolo_chula.npz
    python -m analysis.training.site_readable score --signals .train/signals_v180 \\
        --held-out .train/s13/lolo_chula.npz,.train/s13/lolo_bccd.npz --slides
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from analysis.classes import CLASS_NAMES
from analysis.classifier import WEIGHTS_DIR, DiffusionClassifier, read_calibration
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.reference import load_reference, reference_logits, reference_posterior
from analysis.review import DENSITY_WEIGHTS, FeatureDensity, ReviewRule, combine, unsure
from analysis.site import MIN_CELLS, UNSURE_ALPHA, UNSURE_CELLS, binomial_tail
from analysis.training.labs import LABS, chula_series, load_lab
from analysis.training.review_rule import SIGNIFICANT, Signals, _load, _subset
from analysis.training.review_signals import aml_half

#: Cells of a slide where a lab has no slide ids (the slide bench's fields per slide).
SLIDE_CELLS = 25
#: Fewer cells than this say too little about a slide.
SLIDE_MIN_CELLS = 10


def other_stain(images: np.ndarray) -> np.ndarray:
    """Cells as a lab with a dark, bluish stain would show them (colour channels reversed,
    gamma 2.5): a look no training lab has, which the shipped reference network reads markedly
    worse (Chula's train cells: all right as they are, 58 % of 60 in this stain)."""
    x = np.ascontiguousarray(images[..., ::-1]).astype(np.float64) / 255.0
    return np.clip(np.rint(255.0 * x ** 2.5), 0, 255).astype(np.uint8)


def _normal(labels: np.ndarray) -> np.ndarray:
    return (labels >= 0) & ~np.isin(labels, SIGNIFICANT)


def posteriors(data: Path, lab: str, weights: Path, out: Path, threads: int) -> None:
    """See the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    classifier = DiffusionClassifier(weights)
    reference, config, _ = load_reference(weights / "reference_effnet.safetensors")
    sets = [(lab, s) for s in ("train", "val", "test")] + [(o, "val") for o in LABS if o != lab]
    rows: dict[str, list[object]] = {k: [] for k in ("p_diff", "p_ref", "labels", "paths", "lab", "split")}
    for name, split in sets:
        d = load_lab(data, name, split, classifier.image_size, FIELD_OF_VIEW_UM)
        if name == "pbc":
            d = d.per_class(48, 0)
        r = load_lab(data, name, split, config.image_size, FIELD_OF_VIEW_UM)
        index = {p: i for i, p in enumerate(r.paths)}
        rows["p_diff"].append(classifier.predict(d.images, torch.Generator("cpu").manual_seed(0)).probabilities)
        rows["p_ref"].append(reference_posterior(reference_logits(reference, r.images[[index[p] for p in d.paths]])[0]))
        rows["labels"].append(d.labels)
        rows["paths"] += list(d.paths)
        rows["lab"] += [name] * len(d)
        rows["split"] += [split] * len(d)
        print(f"{name} {split}: {len(d)} cells", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, p_diff=np.concatenate(rows["p_diff"]), p_ref=np.concatenate(rows["p_ref"]),
             labels=np.concatenate(rows["labels"]), paths=np.array(rows["paths"]),
             lab=np.array(rows["lab"]), split=np.array(rows["split"]))


def site_case(rule: ReviewRule, expected: float, p_diffusion: np.ndarray, p_reference: np.ndarray,
              labels: np.ndarray) -> dict[str, object]:
    """One site: at most :data:`UNSURE_CELLS` of its cells (seeded, as ``calibrate-site``), the
    unsure count, the binomial p, whether marked, and the reported class on the same cells."""
    if len(labels) > UNSURE_CELLS:
        keep = np.sort(np.random.default_rng(0).choice(len(labels), UNSURE_CELLS, replace=False))
        p_diffusion, p_reference, labels = p_diffusion[keep], p_reference[keep], labels[keep]
    k, n = int(unsure(rule, p_diffusion, p_reference).sum()), len(labels)
    p = binomial_tail(k, n, expected)
    label = combine(p_diffusion, p_reference, rule.diffusion_weight).argmax(axis=1)
    balanced = float(np.mean([np.mean(label[labels == c] == c) for c in np.unique(labels)]))
    marked = n >= MIN_CELLS and p < UNSURE_ALPHA
    return {"cells": n, "unsure": k, "share": round(k / n, 4), "p": float(f"{p:.3g}"),
            "marked": bool(marked), "reported_balanced_accuracy": round(balanced, 4),
            "agrees": bool(marked == (balanced < 0.85))}


def _slides(lab: str, paths: np.ndarray) -> np.ndarray:
    """Slide id per cell: a Chula image series; BCCD fields in order, :data:`SLIDE_CELLS` a
    slide (as ``bench/slide_accuracy.py``); other labs' cells in seeded random groups."""
    if lab == "chula":
        return np.array([chula_series(str(p)) for p in paths])
    order = np.argsort(paths) if lab == "bccd" else np.random.default_rng(0).permutation(len(paths))
    out = np.empty(len(paths), object)
    out[order] = [f"{lab}-{i // SLIDE_CELLS}" for i in range(len(paths))]
    return out


def slide_marks(flags: np.ndarray, slides: np.ndarray, expected: float) -> tuple[np.ndarray, int, int]:
    """Cells of slides with far more unsure cells than ``expected`` (binomial p < 0.01, at least
    :data:`SLIDE_MIN_CELLS`), and how many slides were judged and marked."""
    out, judged, marked = np.zeros(len(flags), bool), 0, 0
    for s in np.unique(slides):
        m = slides == s
        if m.sum() < SLIDE_MIN_CELLS:
            continue
        judged += 1
        if binomial_tail(int(flags[m].sum()), int(m.sum()), expected) < UNSURE_ALPHA:
            out[m], marked = True, marked + 1
    return out, judged, marked


def _error(flagged: np.ndarray, label: np.ndarray, truth: np.ndarray) -> dict[str, object]:
    keep = ~flagged
    return {"cells_not_flagged": int(keep.sum()),
            "error": round(float(np.mean(label[keep] != truth[keep])), 4) if keep.any() else None}


def score(signals: Path, held_out: list[Path], data: Path, slides: bool, threads: int) -> dict[str, object]:
    """See the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    calibration = read_calibration(WEIGHTS_DIR)
    rule, expected = _shipped_rule(calibration)
    density = FeatureDensity.load(WEIGHTS_DIR / DENSITY_WEIGHTS)

    def read(name: str) -> Signals:
        return Signals(_load(signals / name), calibration, density, None, rule.diffusion_weight,
                       rule.reference_views)

    out: dict[str, object] = {"site_unsure_share": expected, "alpha": UNSURE_ALPHA}
    cases: dict[str, object] = {}
    test, aml = read("test.npz"), read("aml.npz")
    for lab in LABS:
        g = _subset(test, (test.lab == lab) & _normal(test.labels))
        if lab == "pbc":  # 48 a class, as the per-lab evaluation draws PBC
            take = np.concatenate([np.random.default_rng(0).permutation(np.flatnonzero(g.labels == c))[:48]
                                   for c in np.unique(g.labels)])
            g = _subset(g, np.isin(np.arange(len(g.labels)), take))
        cases[f"{lab} test, shipped models"] = site_case(rule, expected, g.diff_p, g.ref_p, g.labels)
    g = _subset(aml, ~aml_half(aml.paths) & (aml.labels == 0))
    cases["aml_dev second-half neutrophils, shipped models"] = site_case(rule, expected, g.diff_p, g.ref_p, g.labels)
    cases.update(held_out_cases(rule, expected, held_out))
    classifier = DiffusionClassifier(WEIGHTS_DIR)
    reference, config, _ = load_reference(WEIGHTS_DIR / "reference_effnet.safetensors")
    d = load_lab(data, "pbc", "test", classifier.image_size, FIELD_OF_VIEW_UM).per_class(48, 0)
    keep = np.flatnonzero(_normal(d.labels))
    keep = keep[np.sort(np.random.default_rng(0).choice(len(keep), min(UNSURE_CELLS, len(keep)), replace=False))]
    r = load_lab(data, "pbc", "test", config.image_size, FIELD_OF_VIEW_UM)
    index = {p: i for i, p in enumerate(r.paths)}
    p_diffusion = classifier.predict(other_stain(d.images[keep]),
                                     torch.Generator("cpu").manual_seed(0)).probabilities
    p_reference = reference_posterior(reference_logits(
        reference, other_stain(r.images[[index[d.paths[i]] for i in keep]]))[0])
    cases["PBC test in a stain no lab used, shipped models"] = site_case(
        rule, expected, p_diffusion, p_reference, d.labels[keep])
    out["sites"] = cases
    rows = [c for c in cases.values() if isinstance(c, dict)]
    out["sites_verdict"] = {
        "disagreements": sum(not c["agrees"] for c in rows),
        "marked_a_site_read_at_0.90_or_more": any(
            c["marked"] and c["reported_balanced_accuracy"] >= 0.90 for c in rows)}  # type: ignore[operator]
    if slides:
        out["slides"] = _score_slides(rule, read("val.npz"), aml, held_out, expected)
    return out


def held_out_cases(rule: ReviewRule, expected: float, held_out: list[Path]) -> dict[str, object]:
    """Each ``posteriors`` file's held-out lab as a site: its train cells, read by the models
    that never saw it, under the shipped rule (:func:`site_case`)."""
    cases: dict[str, object] = {}
    for path in held_out:
        f = np.load(path)
        lab = str(f["lab"][0])
        m = (f["lab"] == lab) & (f["split"] == "train")
        cases[f"{lab} train, never trained on ({path.name})"] = site_case(
            rule, expected, f["p_diff"][m], f["p_ref"][m], f["labels"][m])
    return cases


def _shipped_rule(calibration: dict[str, object]) -> tuple[ReviewRule, float]:
    rule = ReviewRule.from_dict(calibration["review_rule"])  # type: ignore[arg-type]
    if rule.site_unsure_share is None:
        raise SystemExit("the shipped review rule has no site_unsure_share")
    return rule, float(rule.site_unsure_share)


def _score_slides(rule: ReviewRule, val: Signals, aml: Signals, held_out: list[Path],
                  expected: float) -> dict[str, object]:
    """The per-slide variant (17:10 criterion): the known labs' val normal cells as slides with
    the shipped models, and each held-out lab's cells with the models trained without it (p0
    from their own training labs' val), the error among unflagged cells before and after."""
    out: dict[str, object] = {}
    groups = {lab: _subset(val, (val.lab == lab) & _normal(val.labels)) for lab in LABS}
    groups["aml"] = _subset(aml, aml_half(aml.paths) & (aml.labels == 0))
    for name, g in groups.items():
        _, judged, marked = slide_marks(unsure(rule, g.diff_p, g.ref_p), _slides(name, g.paths), expected)
        out[f"{name} val, shipped models"] = {"slides": judged, "marked": marked}
    significant = [CLASS_NAMES.index(c) for c in rule.significant_classes]
    for path in held_out:
        f = np.load(path)
        lab = str(f["lab"][0])
        p_d, p_r, labels = f["p_diff"], f["p_ref"], f["labels"]
        flags = unsure(rule, p_d, p_r)
        own = (f["split"] == "val") & (f["lab"] != lab) & _normal(labels)
        p0 = max(float(flags[own & (f["lab"] == o)].mean()) for o in np.unique(f["lab"][own]))
        h = f["lab"] == lab
        label = combine(p_d, p_r, rule.diffusion_weight).argmax(axis=1)
        flagged = flags | np.isin(label, significant) | np.isin(p_d.argmax(1), significant) \
            | np.isin(p_r.argmax(1), significant)
        marks, judged, marked = slide_marks(flags[h], _slides(lab, f["paths"][h]), p0)
        out[f"{lab}, never trained on ({path.name})"] = {
            "p0": round(p0, 4), "slides": judged, "marked": marked,
            "before": _error(flagged[h], label[h], labels[h]),
            "after": _error(flagged[h] | marks, label[h], labels[h])}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("posteriors", help="both models of a leave-one-lab-out weights folder")
    a.add_argument("--lab", required=True, choices=LABS)
    a.add_argument("--weights", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("score", help="the criterion's cases")
    b.add_argument("--signals", type=Path, required=True, help="a review_signals folder (test, aml)")
    b.add_argument("--held-out", default="", help="comma-separated files of `posteriors`")
    b.add_argument("--slides", action="store_true", help="also the per-slide variant (needs val)")
    b.add_argument("--out", type=Path)
    c = sub.add_parser("held-out", help="only the held-out labs' cases (no review_signals folder)")
    c.add_argument("--held-out", required=True, help="comma-separated files of `posteriors`")
    c.add_argument("--out", type=Path)
    for q in (a, b):
        q.add_argument("--data", type=Path, default=Path("../shared/data"))
        q.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "posteriors":
        posteriors(args.data, args.lab, args.weights, args.out, args.threads)
        return 0
    held = [Path(x) for x in args.held_out.split(",") if x.strip()]
    if args.command == "held-out":
        rule, expected = _shipped_rule(read_calibration(WEIGHTS_DIR))
        result: dict[str, object] = {"site_unsure_share": expected, "alpha": UNSURE_ALPHA,
                                     "sites": held_out_cases(rule, expected, held)}
    else:
        result = score(args.signals, held, args.data, args.slides, args.threads)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
