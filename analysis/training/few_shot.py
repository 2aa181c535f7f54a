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

With ``--diffusion W`` (a weights folder whose diffusion classifier never saw the lab) the
reported class, both models combined, is scored too, under the shipped rule's weight and
under the designs of the 14:37 criterion (``analysis/training/criteria.txt``). ``--verify
WEIGHTS`` reports what ``calibrate-site --labelled`` estimates of a lab with those weights
(:func:`analysis.site_adapt.verify_site`; named cells from val):

    python -m analysis.training.few_shot --lab chula --reference .train/ms/ref_no_chula_base_s2.safetensors \\
        --pack .train/ms/pack_no_chula.safetensors --diffusion .train/lolo_site/no_chula/w --seed 0
    python -m analysis.training.few_shot --lab bccd --verify analysis/weights --seed 0

Two designs that train more than the last layer (measured, not what the node does;
``bench/lolo_site_finetune.sh``): ``--finetune STEPS`` trains the whole site network on the
named cells after the refit (FT, :func:`analysis.site_adapt.finetune_network`), and
``--diffusion-finetune STEPS`` trains a copy of the diffusion classifier on them where the gate
opens (DFT, :func:`analysis.site_adapt.finetune_diffusion`); its rows are "DFT ...".
``--ruled`` fine-tunes only where the shipped models read the named cells below the validated
level (:func:`analysis.site_adapt.finetune_rule`) and adds the row "DFT always rule weight" (the
diffusion fine-tune wherever the rule allows); ``--named-split val`` draws the named cells from
val, for a lab the models trained on (``bench/site_finetune_ruled.sh``); with ``--clearly`` the
rule asks the whole 95 % interval of that reading to lie below it. A ruled run also scores the
row "DFT always matched threshold": a fine-tuned site under its own uncertainty threshold
(:func:`analysis.site_adapt.matched_threshold`, matched on the named split's unnamed cells), what
``calibrate-site --labelled`` does by default (``RULE=matched bench/site_finetune_ruled.sh``).
``--verify-folds`` computes only a site's verification, and for a fine-tuned site also the
verification out of fold (:func:`run_fold_verification`; ``bench/site_verify_folds.sh``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from analysis.classifier import WEIGHTS_DIR
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.review import ReviewRule, combine
from analysis.site_adapt import (
    DIFFUSION_FINETUNE_STEPS,
    FINETUNE_STEPS,
    GATE_MARGIN,
    SiteNetwork,
    SiteVerification,
    SourcePack,
    balanced_adapt_batchnorm,
    class_balanced_weights,
    fit_site_network,
    refit_beside,
)
from analysis.training.evaluate_labs import class_metrics, metrics, print_result
from analysis.training.labs import LABS, LabCells, concat, load_lab, load_splits
from analysis.uncertainty import balanced_accuracy


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


#: The diffusion weights a site's labelled cells choose among in design H2 (criteria.txt,
#: 14:37; measured, not shipped: :func:`choose_diffusion_weight`).
SITE_DIFFUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclasses.dataclass(frozen=True)
class WeightChoice:
    """:func:`choose_diffusion_weight`'s result."""

    weight: float
    #: Balanced accuracy on the labelled cells of the reported class at each candidate weight.
    scores: dict[float, float]


def choose_diffusion_weight(p_diffusion: np.ndarray, p_site: np.ndarray, labels: np.ndarray,
                            shipped: float, *, candidates: tuple[float, ...] = SITE_DIFFUSION_WEIGHTS,
                            margin: float = GATE_MARGIN) -> WeightChoice:
    """The diffusion classifier's weight in the reported class (:func:`analysis.review.combine`)
    for a site with its own network: the balanced accuracy on the site's labelled cells of the
    combination of ``p_diffusion`` (the diffusion classifier's posteriors on them) with
    ``p_site`` (the site network's, each cell's from a head fitted without it:
    ``SiteNetwork.held_out_probabilities``) at each candidate weight. ``shipped`` (the review
    rule's weight) is kept unless another beats it by ``margin``; then the best, ties to the
    lower weight (the site network carries what was fitted for the site)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = p_site.shape[1]
    weights = sorted(set(candidates) | {float(shipped)})
    scores = {w: round(balanced_accuracy(labels, combine(p_diffusion, p_site, w).argmax(axis=1), n), 4)
              for w in weights}
    best = max(weights, key=lambda w: (scores[w], -w))
    chosen = best if scores[best] >= scores[float(shipped)] + margin else float(shipped)
    return WeightChoice(chosen, scores)


def fit_log_offsets(p: np.ndarray, labels: np.ndarray, *, l2: float = 0.1) -> np.ndarray:
    """Per-class additive offsets to ``log p`` maximising the class-balanced likelihood of
    ``labels`` (a site's bias toward some classes, e.g. reading its neutrophils as eosinophils),
    with an L2 penalty ``l2``; classes without a labelled cell keep 0."""
    labels = np.asarray(labels, dtype=np.int64)
    logp = torch.from_numpy(np.log(np.clip(np.asarray(p, np.float64), 1e-12, 1.0)))
    w = torch.from_numpy(class_balanced_weights(labels, 1.0))
    y = torch.from_numpy(labels)
    present = torch.zeros(logp.shape[1], dtype=torch.float64)
    present[np.unique(labels)] = 1.0
    b = torch.zeros(logp.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        nll = torch.nn.functional.cross_entropy(logp + b * present, y, reduction="none")
        loss = (w * nll).sum() + l2 * (b * present).square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return (b * present).detach().numpy()


def apply_log_offsets(p: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``p`` with :func:`fit_log_offsets`'s offsets added to its logarithm, renormalised."""
    z = np.log(np.clip(np.asarray(p, np.float64), 1e-12, 1.0)) + offsets
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(z / z.sum(axis=1, keepdims=True))


def _probabilities(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    from analysis.reference import reference_logits, reference_posterior

    return reference_posterior(reference_logits(model, images)[0])


def _images_at(cells: LabCells, paths: tuple[str, ...]) -> np.ndarray:
    """The images of ``cells`` (another framing of the same split) in the order of ``paths``."""
    where = {p: i for i, p in enumerate(cells.paths)}
    return cells.images[[where[p] for p in paths]]


def _reported(p: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, object]:
    """The class of posterior ``p``, the share whose entropy exceeds the rule's ``threshold``
    and the error among the rest."""
    from analysis.uncertainty import entropy

    label = p.argmax(axis=1)
    flagged = entropy(p) > threshold
    kept = ~flagged
    return {**class_metrics(label, labels), "flagged_uncertain": round(float(flagged.mean()), 4),
            "error_among_not_flagged": (round(float(np.mean(label[kept] != labels[kept])), 4)
                                        if kept.any() else None)}


def _out_of_fold_offsets(p: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """``p`` with per-class log-offsets, each cell's fitted without its fold (the gate's folds)."""
    from analysis.site_adapt import GATE_FOLDS, folds

    out = np.array(p, dtype=np.float64)
    fold = folds(labels, seed=seed)
    for k in range(GATE_FOLDS):
        held = fold == k
        if held.any():
            out[held] = apply_log_offsets(p[held], fit_log_offsets(p[~held], labels[~held]))
    return out


def _reported_variants(fitted: SiteNetwork, p_site: np.ndarray, p_shipped: np.ndarray,
                       d_scored: np.ndarray, d_shot: np.ndarray, shot_labels: np.ndarray,
                       labels: np.ndarray, rule: ReviewRule, seed: int,
                       d_site: np.ndarray | None = None,
                       d_always: np.ndarray | None = None,
                       site_threshold: float | None = None) -> dict[str, object]:
    """The reported class (both models combined) under each way of weighing the diffusion
    classifier at a site with its own network (criteria.txt, 14:37): R0 the rule's weight,
    R1 the site network alone, H2 the weight the named cells choose, H3 likewise after per-class
    log-offsets on the diffusion posterior fitted on them. Where the gate stays shut every
    variant is the shipped network at the rule's weight. ``d_site``: the posteriors of the
    diffusion classifier fine-tuned for the site (DFT, criteria.txt 23:33), used where the gate
    opens; ``d_always``: likewise, fine-tuned wherever the fine-tune rule allows, the gate open or
    shut (candidate B of criteria.txt, 2026-12-06 02:09); ``site_threshold``: B under the fine-tuned
    site's own uncertainty threshold (:func:`analysis.site_adapt.matched_threshold`; the rule's
    where nothing was fine-tuned), the row "DFT always matched threshold"."""
    w, u = rule.diffusion_weight, rule.uncertainty_threshold
    shipped = combine(d_scored, p_shipped, w)
    dft: dict[str, object] = {}
    if d_site is not None:
        dft = {"DFT diffusion fine-tuned alone": _reported(d_site, labels, u),
               "DFT rule weight": _reported(combine(d_site, p_site, w) if fitted.used else shipped,
                                            labels, u)}
    if d_always is not None:
        always = combine(d_always, p_site if fitted.used else p_shipped, w)
        dft["DFT always rule weight"] = _reported(always, labels, u)
        if site_threshold is not None:
            dft["DFT always matched threshold"] = _reported(always, labels, site_threshold)
    h2 = choose_diffusion_weight(d_shot, fitted.held_out_probabilities, shot_labels, w)
    h3 = choose_diffusion_weight(_out_of_fold_offsets(d_shot, shot_labels, seed),
                                 fitted.held_out_probabilities, shot_labels, w)
    d_offset = apply_log_offsets(d_scored, fit_log_offsets(d_shot, shot_labels))
    posteriors = {"R0 rule weight": combine(d_scored, p_site, w), "R1 site network alone": p_site,
                  "H2 weight chosen": combine(d_scored, p_site, h2.weight),
                  "H3 offsets + weight chosen": combine(d_offset, p_site, h3.weight)}
    rows: dict[str, object] = {
        "diffusion alone": _reported(d_scored, labels, u),
        "diffusion with offsets": _reported(d_offset, labels, u),
        "shipped network, rule weight": _reported(shipped, labels, u),
        "H2 choice": {"weight": h2.weight, "named cells": {str(k): v for k, v in h2.scores.items()}},
        "H3 choice": {"weight": h3.weight, "named cells": {str(k): v for k, v in h3.scores.items()}},
    }
    for name, post in posteriors.items():
        rows[name] = _reported(post if fitted.used else shipped, labels, u)
    rows.update(dft)
    return rows


def _matched_threshold(cells: LabCells, d_cells: LabCells, named: tuple[str, ...],
                       networks: tuple[torch.nn.Module, torch.nn.Module], classifiers: tuple[object, object],
                       rule: ReviewRule, seed: int, *,
                       scored: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> dict[str, object]:
    """The fine-tuned site's own uncertainty threshold (:func:`analysis.site_adapt.matched_threshold`,
    criteria.txt, seventeenth session) on the site's unlabelled cells: those of the named
    cells' split (``cells`` framed for the networks, ``d_cells`` for the diffusion classifiers)
    that were not ``named``; where fewer than :data:`analysis.site.MIN_CELLS` are left, the scored
    cells (labels unread):
    ``scored`` = their shipped diffusion, shipped network, site diffusion and site network
    posteriors. ``networks`` and ``classifiers``: (shipped, the site's)."""
    from analysis.site import MIN_CELLS
    from analysis.site_adapt import matched_threshold
    from analysis.uncertainty import entropy

    w, u = rule.diffusion_weight, rule.uncertainty_threshold
    drawn = set(named)
    rest = tuple(p for p in cells.paths if p not in drawn)
    if len(rest) >= MIN_CELLS:
        on = f"{len(rest)} unnamed cells of the named split"
        generator = lambda: torch.Generator("cpu").manual_seed(seed)
        d_images = _images_at(d_cells, rest)
        images = _images_at(cells, rest)
        posteriors = [classifiers[0].predict(d_images, generator()).probabilities,  # type: ignore[attr-defined]
                      _probabilities(networks[0], images),
                      classifiers[1].predict(d_images, generator()).probabilities,  # type: ignore[attr-defined]
                      _probabilities(networks[1], images)]
    else:
        on = f"the {len(scored[0])} scored cells (labels unread; {len(rest)} unnamed in the named split)"
        posteriors = list(scored)
    shipped = entropy(combine(posteriors[0], posteriors[1], w))
    site = entropy(combine(posteriors[2], posteriors[3], w))
    t = matched_threshold(shipped, site, u)
    print(f"  site threshold {t:.4f} (rule {u:.4f}) on {on}: shipped flags {np.mean(shipped > u):.1%}, "
          f"the site's models under u {np.mean(site > u):.1%}", file=sys.stderr)
    return {"threshold": t, "rule_threshold": u, "on": on,
            "shipped_share": round(float(np.mean(shipped > u)), 4),
            "site_share_under_rule": round(float(np.mean(site > u)), 4),
            "site_share": round(float(np.mean(site > t)), 4)}


def _named_draw(site_train: LabCells, adapt: LabCells, k: int, seed: int) -> tuple[LabCells, np.ndarray]:
    """The site's named cells (``k`` a class of ``site_train``, seeded) and the images of its
    ``adapt`` cells that were not named (its unlabelled cells)."""
    shot = site_train.per_class(k, seed)
    drawn = set(shot.paths)
    return shot, adapt.images[[i for i, path in enumerate(adapt.paths) if path not in drawn]]


def _verified(v: SiteVerification) -> dict[str, object]:
    """A :class:`analysis.site_adapt.SiteVerification` as a result row; ``below_minimum``: its
    figure below :data:`analysis.site_adapt.VERIFIED_MINIMUM`."""
    from analysis.site_adapt import VERIFIED_MINIMUM

    return {**dataclasses.asdict(v), "below_minimum": v.balanced_accuracy < VERIFIED_MINIMUM}


def run_site_network(data_root: Path, lab: str, reference: Path, pack_path: Path, *,
                     ks: tuple[int, ...] = (10,), score_splits: str = "val+test",
                     adapt_splits: str = "train+val+test", seed: int = 0,
                     diffusion: Path | None = None, per_class: int = 0,
                     finetune_steps: int = 0, diffusion_finetune: int = 0,
                     named_split: str = "train", ruled: bool = False,
                     clearly: bool = False) -> dict[str, object]:
    """What the node's ``calibrate-site --labelled`` does (:func:`analysis.site_adapt.fit_site_network`):
    class-balanced AdaBN on the site's ``adapt_splits`` cells (labels unread), the last layer
    refitted on ``k`` labelled train cells per class beside the shipped-size ``pack``.

    ``diffusion``: a weights folder with a diffusion classifier (and its calibration) trained
    without the lab: the reported class is then scored too (:func:`_reported_variants`), with
    the shipped review rule's weight and threshold. ``per_class``: score at most that many
    cells of each class (seeded). ``named_split``: the split the named cells are drawn from
    (never one scored). ``ruled``: fine-tune only where the shipped models read the named cells
    below the validated level (:func:`analysis.site_adapt.finetune_rule`; needs ``diffusion``),
    and score the diffusion classifier fine-tuned wherever the rule allows too ("DFT always")."""
    from analysis.reference import load_reference
    from analysis.site_adapt import finetune_rule

    if named_split in score_splits.split("+"):
        raise ValueError(f"the named cells' split {named_split!r} must not be scored ({score_splits})")
    if ruled and diffusion is None:
        raise ValueError("the fine-tune rule reads the shipped diffusion classifier: give diffusion")

    model, config, metadata = load_reference(reference)
    size = config.image_size
    pack = SourcePack.load(pack_path)
    trained_on = set(metadata.get("labs", "").split(","))
    if not set(pack.labs) <= trained_on:
        raise ValueError(f"{pack_path} must hold cells of {reference}'s training labs "
                         f"({', '.join(sorted(trained_on))}), not {sorted(set(pack.labs))}")
    site_train: LabCells = load_lab(data_root, lab, named_split, size, FIELD_OF_VIEW_UM)
    scored = load_splits(data_root, lab, score_splits, size, FIELD_OF_VIEW_UM)
    if per_class:
        scored = scored.per_class(per_class, seed)
    adapt = load_splits(data_root, lab, adapt_splits, size, FIELD_OF_VIEW_UM)
    rows: dict[str, object] = {"unchanged": _score(model._fc, _features(model, scored.images),
                                                   scored.labels)}
    if diffusion is not None:
        from analysis.classifier import DiffusionClassifier, read_calibration

        classifier = DiffusionClassifier(diffusion)
        dsize = classifier.image_size
        rule = ReviewRule.from_dict(read_calibration(WEIGHTS_DIR)["review_rule"])  # type: ignore[arg-type]
        d_cells = load_splits(data_root, lab, score_splits, dsize, FIELD_OF_VIEW_UM)
        d_train = load_lab(data_root, lab, named_split, dsize, FIELD_OF_VIEW_UM)
        d_scored = classifier.predict(_images_at(d_cells, scored.paths),
                                      torch.Generator("cpu").manual_seed(seed)).probabilities
        p_shipped = _probabilities(model, scored.images)
    for k in ks:
        shot, rest = _named_draw(site_train, adapt, k, seed)
        steps, d_steps, ruling = finetune_steps, diffusion_finetune, None
        if diffusion is not None:
            d_shot = classifier.predict(_images_at(d_train, shot.paths),
                                        torch.Generator("cpu").manual_seed(seed)).probabilities
            if ruled:
                ruling = finetune_rule(d_shot, _probabilities(model, shot.images), shot.labels,
                                       rule.diffusion_weight, clearly=clearly)
                print(f"  {lab} k={k} rule: {ruling.text}", file=sys.stderr)
                if not ruling.finetune:
                    steps = d_steps = 0
        fitted = fit_site_network(model, rest, shot.images, shot.labels, pack, seed=seed,
                                  finetune_steps=steps)
        net = fitted.model
        row = {"site_cells": len(shot), "adapted_on": len(rest) + len(shot),
               **_score(net._fc, _features(net, scored.images), scored.labels)}
        if diffusion is not None:  # what calibrate-site reports of the site (verify_site)
            from analysis.site_adapt import verify_site

            row["verified"] = _verified(verify_site(d_shot, fitted.probabilities, shot.labels,
                                                    rule.diffusion_weight))
        if ruling is not None:
            row["rule"] = {"shipped_reads_named": ruling.shipped.balanced_accuracy,
                           "interval_95": [ruling.shipped.low, ruling.shipped.high],
                           "clearly": clearly, "finetuned": ruling.finetune}
        if diffusion is not None:
            p_site, site_threshold = _probabilities(net, scored.images), None
            d_site = d_scored if diffusion_finetune else None  # the gate shut: nothing changes
            d_always = d_scored if ruled and diffusion_finetune else None
            if d_steps and (fitted.used or ruled):
                from analysis.site_adapt import finetune_diffusion, resample

                load = classifier.image_size * 4 // 3
                d_load = load_lab(data_root, lab, named_split, load, FIELD_OF_VIEW_UM)
                site_classifier = copy.copy(classifier)
                site_classifier.unet = finetune_diffusion(
                    classifier.unet, classifier.model_config, _images_at(d_load, shot.paths),
                    shot.labels, resample(pack.images, load), pack.labels,
                    steps=d_steps, seed=seed)
                d_tuned = site_classifier.predict(_images_at(d_cells, scored.paths),
                                                  torch.Generator("cpu").manual_seed(seed)).probabilities
                d_site = d_tuned if fitted.used else d_site
                d_always = d_tuned if ruled else None
                if ruled:
                    matched = _matched_threshold(
                        site_train, d_train, shot.paths, (model, net if fitted.used else model),
                        (classifier, site_classifier), rule, seed,
                        scored=(d_scored, p_shipped, d_tuned, p_site if fitted.used else p_shipped))
                    row["site_threshold"] = matched
                    site_threshold = matched["threshold"]
            elif ruled and diffusion_finetune:
                site_threshold = rule.uncertainty_threshold  # nothing fine-tuned: the rule's
            row["reported"] = _reported_variants(
                fitted, p_site, p_shipped, d_scored, d_shot,
                shot.labels, scored.labels, rule, seed, d_site, d_always, site_threshold)
            for name, r in row["reported"].items():  # type: ignore[union-attr]
                print(f"  {lab} k={k} {name}: {r.get('balanced_accuracy', r)}", file=sys.stderr)
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
            "finetune_steps": finetune_steps, "diffusion_finetune_steps": diffusion_finetune,
            "scored_on": f"{lab} {score_splits}", "adapted_on": f"{lab} {adapt_splits}",
            "named_from": f"{lab} {named_split}", "ruled": ruled,
            "cells": len(scored), "seed": seed, "site network": rows}


def run_fold_verification(data_root: Path, lab: str, reference: Path, pack_path: Path,
                          diffusion: Path, *, seed: int = 0, k: int = 10, named_split: str = "train",
                          adapt_splits: str = "train+val+test", finetune_steps: int = FINETUNE_STEPS,
                          diffusion_finetune: int = DIFFUSION_FINETUNE_STEPS,
                          clearly: bool = True) -> dict[str, object]:
    """A site's verification (criteria.txt, 2026-12-06 07:51): the named cells drawn, the rule
    and the site network fitted as :func:`run_site_network` does for the same arguments
    (``--ruled``), then :func:`analysis.site_adapt.verify_site` with the shipped diffusion
    classifier's posteriors (``verified``, what calibrate-site reports) and, where the rule
    fine-tunes, with the fine-tuned one's out of fold (``verified_out_of_fold``,
    :func:`analysis.site_adapt.out_of_fold_diffusion`; measured, not what the node does).
    Nothing is scored: the figures are compared with the scored run's reported class afterwards
    (``bench/site_verify_folds.sh``)."""
    from analysis.classifier import DiffusionClassifier, read_calibration
    from analysis.reference import load_reference
    from analysis.site_adapt import finetune_rule, out_of_fold_diffusion, resample, verify_site

    model, config, _ = load_reference(reference)
    size = config.image_size
    pack = SourcePack.load(pack_path)
    classifier = DiffusionClassifier(diffusion)
    rule = ReviewRule.from_dict(read_calibration(WEIGHTS_DIR)["review_rule"])  # type: ignore[arg-type]
    site_train = load_lab(data_root, lab, named_split, size, FIELD_OF_VIEW_UM)
    adapt = load_splits(data_root, lab, adapt_splits, size, FIELD_OF_VIEW_UM)
    shot, rest = _named_draw(site_train, adapt, k, seed)
    d_train = load_lab(data_root, lab, named_split, classifier.image_size, FIELD_OF_VIEW_UM)
    read = _images_at(d_train, shot.paths)
    d_shot = classifier.predict(read, torch.Generator("cpu").manual_seed(seed)).probabilities
    ruling = finetune_rule(d_shot, _probabilities(model, shot.images), shot.labels,
                           rule.diffusion_weight, clearly=clearly)
    print(f"  {lab} seed {seed} rule: {ruling.text}", file=sys.stderr)
    out: dict[str, object] = {"lab": lab, "reference": str(reference), "diffusion": str(diffusion),
                              "seed": seed, "named": f"{lab} {named_split}, {k} a class",
                              "finetuned": ruling.finetune}
    fitted = fit_site_network(model, rest, shot.images, shot.labels, pack, seed=seed,
                              finetune_steps=finetune_steps if ruling.finetune else 0)
    read_by = [("verified", d_shot)]  # a site not fine-tuned: what calibrate-site verifies
    if ruling.finetune:
        load = classifier.image_size * 4 // 3
        d_load = load_lab(data_root, lab, named_split, load, FIELD_OF_VIEW_UM)
        read_by.append(("verified_out_of_fold", out_of_fold_diffusion(
            classifier, _images_at(d_load, shot.paths), read, shot.labels, resample(pack.images, load),
            pack.labels, steps=diffusion_finetune, seed=seed)))
    for name, p in read_by:
        out[name] = v = _verified(verify_site(p, fitted.probabilities, shot.labels, rule.diffusion_weight))
        print(f"  {lab} seed {seed} {name}: {v['balanced_accuracy']} ({v['low']}-{v['high']})", file=sys.stderr)
    out["gate_open"] = fitted.used
    return out


def run_verification(data_root: Path, lab: str, weights_dir: Path, *, seed: int = 0, k: int = 10,
                     named_split: str = "val", per_class: int = 48) -> dict[str, object]:
    """What ``calibrate-site --labelled`` reports of a site it is given (:func:`verify_site`):
    ``k`` named cells a class drawn from the lab's ``named_split``, the rest of that split
    (at most ``per_class`` a class) as the site's unlabelled cells, the networks, pack and
    rule of ``weights_dir``."""
    from analysis.classifier import REFERENCE_WEIGHTS, DiffusionClassifier, read_calibration
    from analysis.reference import load_reference
    from analysis.site_adapt import SOURCE_PACK, VERIFIED_MINIMUM, verify_site

    model, config, _ = load_reference(weights_dir / REFERENCE_WEIGHTS)
    classifier = DiffusionClassifier(weights_dir)
    rule = ReviewRule.from_dict(read_calibration(weights_dir)["review_rule"])  # type: ignore[arg-type]
    pack = SourcePack.load(weights_dir / SOURCE_PACK)
    cells = load_lab(data_root, lab, named_split, config.image_size, FIELD_OF_VIEW_UM)
    shot = cells.per_class(k, seed)
    drawn = set(shot.paths)
    rest = cells.take(np.array([i for i, p in enumerate(cells.paths) if p not in drawn]))
    rest = rest.per_class(per_class, seed)
    fitted = fit_site_network(model, rest.images, shot.images, shot.labels, pack, seed=seed)
    d_cells = load_lab(data_root, lab, named_split, classifier.image_size, FIELD_OF_VIEW_UM)
    d_shot = classifier.predict(_images_at(d_cells, shot.paths),
                                torch.Generator("cpu").manual_seed(seed)).probabilities
    v = verify_site(d_shot, fitted.probabilities, shot.labels, rule.diffusion_weight)
    print(f"{lab} seed {seed}: verification {v.balanced_accuracy} on {v.cells} named cells "
          f"(gate {'open' if fitted.used else 'shut'}: {fitted.shipped_accuracy} / {fitted.site_accuracy})",
          file=sys.stderr)
    return {"lab": lab, "weights": str(weights_dir), "named": f"{lab} {named_split}, {k} a class",
            "seed": seed, "site_cells": len(rest), "gate_open": fitted.used,
            "shipped_cv": fitted.shipped_accuracy, "site_cv": fitted.site_accuracy,
            "verification": dataclasses.asdict(v), "below_minimum": v.balanced_accuracy < VERIFIED_MINIMUM}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--lab", choices=LABS, required=True,
                   help="the site's lab (held out of the reference's training, or one it trained "
                        "on: what refitting does where there is no shift)")
    p.add_argument("--reference", type=Path, help="the reference network (all but --verify)")
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
    p.add_argument("--diffusion", type=Path,
                   help="with --pack: a weights folder whose diffusion classifier (and calibration) "
                        "never saw the lab: also score the reported class (both models combined)")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                   help="with --pack: fine-tune the whole site network this many steps after the "
                        "refit (site_adapt.finetune_network)")
    p.add_argument("--diffusion-finetune", type=int, default=0, metavar="STEPS",
                   help="with --diffusion: where the gate opens, also fine-tune the diffusion "
                        "classifier this many steps on the named cells (site_adapt.finetune_diffusion)")
    p.add_argument("--named-split", choices=("train", "val", "test"), default="train",
                   help="with --pack: the split the named cells are drawn from (never one scored)")
    p.add_argument("--ruled", action="store_true",
                   help="with --diffusion: fine-tune only where the shipped models read the named "
                        "cells below the validated level (site_adapt.finetune_rule); also score "
                        "the diffusion fine-tune wherever the rule allows ('DFT always')")
    p.add_argument("--clearly", action="store_true",
                   help="with --ruled: fine-tune only where the whole 95%% interval of the shipped "
                        "models' reading of the named cells lies below the validated level")
    p.add_argument("--per-class", type=int, default=0,
                   help="score at most this many cells of each class (e.g. PBC val)")
    p.add_argument("--verify", type=Path, metavar="WEIGHTS",
                   help="report what calibrate-site --labelled estimates of the lab with these weights "
                        "(run_verification; named cells from val)")
    p.add_argument("--verify-folds", action="store_true",
                   help="with --pack and --diffusion: only the site's verification as calibrate-site "
                        "computes it, and where the rule fine-tunes also out of fold (run_fold_verification)")
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
    if not args.verify and args.reference is None:
        p.error("--reference is required (but for --verify)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.verify_folds:
        if not (args.pack and args.diffusion):
            p.error("--verify-folds needs --pack and --diffusion")
        result = run_fold_verification(args.data, args.lab, args.reference, args.pack, args.diffusion,
                                       seed=args.seed, k=ks[0], named_split=args.named_split,
                                       adapt_splits=args.adapt_splits,
                                       finetune_steps=args.finetune or FINETUNE_STEPS,
                                       diffusion_finetune=args.diffusion_finetune or DIFFUSION_FINETUNE_STEPS,
                                       clearly=args.clearly)
    elif args.verify:
        result = run_verification(args.data, args.lab, args.verify, seed=args.seed)
    elif args.pack:
        result = run_site_network(args.data, args.lab, args.reference, args.pack, ks=ks,
                                  score_splits=args.score_splits, adapt_splits=args.adapt_splits,
                                  seed=args.seed, diffusion=args.diffusion,
                                  per_class=args.per_class, finetune_steps=args.finetune,
                                  diffusion_finetune=args.diffusion_finetune,
                                  named_split=args.named_split, ruled=args.ruled,
                                  clearly=args.clearly)
    else:
        result = run(args.data, args.lab, args.reference, ks=ks, score_splits=args.score_splits,
                     seed=args.seed, site_share=args.site_share, balanced_bn=args.balanced_bn)
    print_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
