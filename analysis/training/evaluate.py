"""Calibration on PBC val and evaluation on PBC test and aml_dev, for both models.

``calibrate`` fits everything that is tuned (posterior temperature, review
threshold, anomaly normalisation, abnormal threshold) on the val split only and
writes ``calibration.json`` next to the weights. ``evaluate`` measures on data
never trained or tuned on: PBC test and aml_dev (Matek et al. 2019).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from analysis.baseline import BaselineCNN, load_baseline, predict_baseline
from analysis.classes import CLASS_NAMES
from analysis.classifier import (
    ANOMALY_SCORE,
    BASELINE_WEIGHTS,
    CALIBRATION,
    DIFFUSION_WEIGHTS,
    REFERENCE_WEIGHTS,
    Predictions,
    cnn_predictions,
    diffusion_predictions,
    read_calibration,
)
from analysis.classify import (
    ClassifierConfig,
    anomaly_raw,
    diffusion_metadata_summary,
    error_deltas,
    images_to_tensor,
    load_diffusion,
    posterior,
    score_cells,
)
from analysis.errors import CheckpointError, DatasetError
from analysis.framing import collect_image_paths, folder_spacing_um, read_framed
from analysis.training.pbc import LabelledImages, load_images, read_split
from analysis.uncertainty import (
    aurc,
    auroc,
    balanced_accuracy,
    entropy,
    expected_calibration_error,
    fit_beta,
    per_class_recall,
    review_threshold,
)

log = logging.getLogger(__name__)

AML_BLASTS = "myeloblast_MYO"
AML_NEUTROPHILS = "neutrophil_segmented_NGS"


def stratified_rows(rows: list[tuple[str, int]], per_class: int, seed: int) -> list[tuple[str, int]]:
    """Up to ``per_class`` rows of each class (all if 0), in a seeded random order per class."""
    if per_class <= 0:
        return rows
    rng = np.random.default_rng(seed)
    out: list[tuple[str, int]] = []
    for c in sorted({label for _, label in rows}):
        of_class = [r for r in rows if r[1] == c]
        pick = rng.permutation(len(of_class))[:per_class]
        out.extend(of_class[i] for i in sorted(pick))
    return out


def load_folder(folder: Path, size: int, limit: int = 0) -> np.ndarray:
    """Frame every image of a folder (sorted; the first ``limit`` if > 0) at the folder's
    pixel spacing (:func:`analysis.framing.folder_spacing_um`: the images come from one lab
    and scanner)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found")
    paths = collect_image_paths([folder])
    if limit > 0:
        paths = paths[:limit]
    spacing = folder_spacing_um(paths)
    return np.stack([read_framed(p, size, spacing) for p in paths])


def other_labs_val(pbc_dir: Path, size: int, names: tuple[str, ...]) -> list[LabelledImages]:
    """The val cells of the labs beside PBC (``bccd/``, ``chula_wbc/`` next to ``pbc_dir``)."""
    from analysis.framing import FIELD_OF_VIEW_UM
    from analysis.training.labs import load_lab

    root = pbc_dir.parent
    out = []
    for lab, folder in (("bccd", "bccd"), ("chula", "chula_wbc")):
        if (root / folder).is_dir():
            cells = load_lab(root, lab, "val", size, FIELD_OF_VIEW_UM, names)
            out.append(LabelledImages(cells.images, cells.labels, cells.paths))
    return out


def calibrate(weights_dir: Path, data_dir: Path, config: ClassifierConfig, *, per_class: int,
              seed: int, target_error: float = 0.01, abnormal_quantile: float = 0.99
              ) -> dict[str, object]:
    """Fit the calibration on PBC val and write ``calibration.json``.

    Returns
    -------
    dict
        The calibration plus val metrics of both models.
    """
    unet, model_config, metadata = load_diffusion(weights_dir / DIFFUSION_WEIGHTS, config.device)
    names = model_config.class_names
    rows = stratified_rows(read_split(data_dir, "val", names), per_class, seed)
    data = load_images(data_dir, rows, model_config.image_size)
    # The other labs' val cells too (all of them: a few dozen a class), so that the posterior's
    # temperature and the thresholds are those of every lab the model serves.
    others = other_labs_val(data_dir, model_config.image_size, names)
    if others:
        data = LabelledImages(np.concatenate([data.images, *(o.images for o in others)]),
                              np.concatenate([data.labels, *(o.labels for o in others)]),
                              data.paths + tuple(p for o in others for p in o.paths))
        rows = rows + [(p, int(label)) for o in others for p, label in zip(o.paths, o.labels)]
    generator = torch.Generator("cpu").manual_seed(seed)
    t0 = time.monotonic()
    scores = score_cells(unet, model_config, images_to_tensor(data.images), config, generator)
    log.info("val: %d cells scored in %.0f s", len(rows), time.monotonic() - t0)
    labels = data.labels
    deltas, best = error_deltas(scores.errors, scores.error_scale)
    beta = fit_beta(deltas, labels)
    p = posterior(deltas, beta)
    u = entropy(p)
    # -inf (flag every cell) is written as -1: uncertainties are never negative.
    thr = max(review_threshold(u, best == labels, target_error), -1.0)
    # Per-timestep reference error: median best-class error of val cells.
    e_best = scores.errors[np.arange(len(best)), best]  # (N, T)
    reference = np.nanmedian(e_best, axis=0)
    reference = np.where(np.isnan(reference), np.nanmedian(e_best), reference)
    raw = anomaly_raw(scores.errors, best, reference)
    mean = np.zeros(len(names))
    std = np.ones(len(names))
    for c in range(len(names)):
        of_c = raw[best == c]
        if len(of_c) >= 2:
            mean[c], std[c] = float(of_c.mean()), float(max(of_c.std(ddof=1), 1e-6))
        elif len(of_c) == 1:
            mean[c] = float(of_c[0])
    z = (raw - mean[best]) / std[best]
    calibration: dict[str, object] = {
        "diffusion_weights": DIFFUSION_WEIGHTS,
        "train_step": int(metadata.get("step", "0")),
        "classifier_config": {**config.to_dict(), "device": "cpu"},
        "seed": seed,
        "val_cells": len(rows),
        "val_cells_pbc": len(rows) - sum(len(o.labels) for o in others),
        "val_labs": ["pbc", *(o.paths[0].split("/")[0] for o in others if o.paths)],
        "val_per_class": per_class,
        "beta": beta,
        "target_error": target_error,
        "review_threshold": thr,
        "anomaly_score": ANOMALY_SCORE,
        "anomaly_reference": reference.tolist(),
        "anomaly_class_mean": mean.tolist(),
        "anomaly_class_std": std.tolist(),
        "abnormal_quantile": abnormal_quantile,
        "abnormal_threshold": float(np.quantile(z, abnormal_quantile)),
    }
    val = {"diffusion": _classification_metrics(diffusion_predictions(scores, calibration), labels,
                                                names)}
    if (weights_dir / BASELINE_WEIGHTS).is_file():
        cnn = _load_cnn(weights_dir, names)
        cnn_rows = read_split(data_dir, "val", names)
        cnn_data = load_images(data_dir, cnn_rows, cnn.config.image_size)
        pc = predict_baseline(cnn, images_to_tensor(cnn_data.images)).numpy().astype(np.float64)
        uc = 1.0 - pc.max(axis=1)
        calibration["cnn"] = {
            "weights": BASELINE_WEIGHTS,
            "val_cells": len(cnn_rows),
            "review_threshold": max(review_threshold(uc, pc.argmax(axis=1) == cnn_data.labels,
                                                     target_error), -1.0),
            "abnormal_threshold": float(np.quantile(uc, abnormal_quantile)),
        }
        val["cnn"] = _classification_metrics(cnn_predictions(pc, calibration), cnn_data.labels,
                                             names)
    if (weights_dir / REFERENCE_WEIGHTS).is_file():
        from analysis.classifier import ReferenceClassifier

        reference = ReferenceClassifier(weights_dir)
        ref_rows = read_split(data_dir, "val", names)
        ref_data = load_images(data_dir, ref_rows, reference.image_size)
        ref_others = other_labs_val(data_dir, reference.image_size, names)
        ref_images = np.concatenate([ref_data.images, *(o.images for o in ref_others)])
        ref_labels = np.concatenate([ref_data.labels, *(o.labels for o in ref_others)])
        pr = reference.probabilities(ref_images)
        ur = 1.0 - pr.max(axis=1)
        calibration["reference"] = {
            "weights": REFERENCE_WEIGHTS,
            "val_cells": len(ref_labels),
            "review_threshold": max(review_threshold(ur, pr.argmax(axis=1) == ref_labels,
                                                     target_error), -1.0),
            "abnormal_threshold": float(np.quantile(ur, abnormal_quantile)),
        }
        val["reference"] = _classification_metrics(
            cnn_predictions(pr, {"cnn": calibration["reference"]}), ref_labels, names)
    (weights_dir / CALIBRATION).write_text(json.dumps(calibration, indent=1) + "\n")
    return {"calibration": calibration, "val": val,
            "model": diffusion_metadata_summary(metadata)}


def _positions(rows: list[tuple[str, int]], subset: list[tuple[str, int]]) -> np.ndarray:
    """Indices of ``subset``'s rows in ``rows``."""
    index = {row: i for i, row in enumerate(rows)}
    return np.array([index[row] for row in subset], dtype=np.int64)


def _load_cnn(weights_dir: Path, names: tuple[str, ...]) -> BaselineCNN:
    """The CNN next to a diffusion model, which must know the same classes."""
    cnn = load_baseline(weights_dir / BASELINE_WEIGHTS)
    if cnn.config.class_names != names:
        raise CheckpointError(f"{weights_dir}: the CNN and the diffusion model have different classes")
    return cnn


def _labelled_as(label: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    """How many cells got each class label."""
    return {name: int(np.sum(label == c)) for c, name in enumerate(names)}


def _same_lab_control(blast: Predictions, neutrophil: Predictions, pbc: Predictions) -> dict[str, float]:
    """Does the anomaly score find the blast or the lab? aml_dev neutrophils are normal cells from
    the blasts' lab and scanner: a score that separates them from PBC test cells as well as it
    separates the blasts detects the domain; blasts against them is the comparison within one lab."""
    return {
        "anomaly_auroc_aml_neutrophils_vs_pbc_test": auroc(neutrophil.anomaly_score, pbc.anomaly_score),
        "anomaly_auroc_aml_blasts_vs_aml_neutrophils": auroc(blast.anomaly_score,
                                                             neutrophil.anomaly_score),
        "aml_neutrophils_flagged_abnormal": float(neutrophil.abnormal.mean()),
    }


def _classification_metrics(pred: Predictions, labels: np.ndarray,
                            names: tuple[str, ...] = CLASS_NAMES) -> dict[str, object]:
    correct = pred.label == labels
    accepted = ~pred.review
    recall = per_class_recall(labels, pred.label, len(names))
    return {
        "cells": len(labels),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": balanced_accuracy(labels, pred.label, len(names)),
        "per_class_recall": {name: (None if np.isnan(r) else float(r))
                             for name, r in zip(names, recall)},
        "ece": expected_calibration_error(pred.probabilities, labels),
        "aurc": aurc(pred.uncertainty, correct),
        "fraction_flagged": float(pred.review.mean()),
        "error_among_not_flagged": (float((~correct[accepted]).mean()) if accepted.any()
                                    else None),
    }


def evaluate(weights_dir: Path, data_dir: Path, aml_dir: Path, config: ClassifierConfig | None, *,
             per_class: int, exhaustive_per_class: int, aml_limit: int, seed: int,
             arrays_out: Path | None = None) -> dict[str, object]:
    """Metrics of both models on PBC test and aml_dev (nothing here is tuned).

    Parameters
    ----------
    config:
        Overrides the classifier configuration stored in the calibration (for
        experiments only; the thresholds were fitted with the stored one).
    per_class:
        PBC test cells per class for the diffusion model (0: the whole split).
        The CNN always sees the whole test split.
    exhaustive_per_class:
        Cells per class (taken from the adaptive subset) also scored exhaustively.
    aml_limit:
        aml_dev images per folder (0: all).
    arrays_out:
        If given, an ``.npz`` with the per-cell outputs (for plots).
    """
    calibration = read_calibration(weights_dir)
    if config is None:
        config = ClassifierConfig.from_calibration(dict(calibration["classifier_config"]))  # type: ignore[call-overload]
    unet, model_config, metadata = load_diffusion(weights_dir / DIFFUSION_WEIGHTS, config.device)
    if model_config.class_names != CLASS_NAMES:
        missing = ", ".join(c for c in CLASS_NAMES if c not in model_config.class_names)
        raise CheckpointError(f"{weights_dir} was trained without {missing}: evaluate it with "
                              f"--heldout-class")
    size = model_config.image_size
    test_rows_all = read_split(data_dir, "test")
    rows = stratified_rows(test_rows_all, per_class, seed)
    # Every test cell is read once: the diffusion model scores a subset, the CNN all of them.
    test_all = load_images(data_dir, test_rows_all, size)
    same = _positions(test_rows_all, rows)
    data = test_all.take(same)
    blasts = load_folder(aml_dir / AML_BLASTS, size, aml_limit)
    neutro = load_folder(aml_dir / AML_NEUTROPHILS, size, aml_limit)
    neutrophil = CLASS_NAMES.index("neutrophil")
    generator = torch.Generator("cpu").manual_seed(seed)

    # Diffusion, adaptive (the product setting): PBC test subset.
    t0 = time.monotonic()
    scores = score_cells(unet, model_config, images_to_tensor(data.images), config, generator)
    wall = time.monotonic() - t0
    log.info("test adaptive: %d cells in %.0f s", len(rows), wall)
    pred = diffusion_predictions(scores, calibration)
    diffusion: dict[str, object] = {"pbc_test": _classification_metrics(pred, data.labels)}
    diffusion["throughput"] = {"mode": "adaptive", "cells": len(rows),
                               "cells_per_s": len(rows) / wall,
                               "unet_evals_per_cell": float(scores.unet_evals.mean()),
                               "threads": torch.get_num_threads()}
    # aml_dev.
    s_blast = score_cells(unet, model_config, images_to_tensor(blasts), config, generator)
    s_neut = score_cells(unet, model_config, images_to_tensor(neutro), config, generator)
    p_blast = diffusion_predictions(s_blast, calibration)
    p_neut = diffusion_predictions(s_neut, calibration)
    diffusion["anomaly_auroc_aml_blasts_vs_pbc_test"] = auroc(p_blast.anomaly_score,
                                                             pred.anomaly_score)
    # The same separation by the posterior's uncertainty (for the CNN the two scores are one).
    diffusion["uncertainty_auroc_aml_blasts_vs_pbc_test"] = auroc(p_blast.uncertainty,
                                                                 pred.uncertainty)
    diffusion["aml_blasts_flagged_abnormal"] = float(p_blast.abnormal.mean())
    diffusion["aml_blasts_flagged_for_review"] = float(p_blast.review.mean())
    diffusion["aml_blasts_labelled_as"] = _labelled_as(p_blast.label, CLASS_NAMES)
    diffusion["pbc_test_flagged_abnormal"] = float(pred.abnormal.mean())
    diffusion["domain_shift_aml_neutrophil_accuracy"] = float(np.mean(p_neut.label == neutrophil))
    diffusion.update(_same_lab_control(p_blast, p_neut, pred))

    # Diffusion, exhaustive, on a per-class prefix of the same subset. Both modes score these
    # cells again from the same seed, so they draw the same noise and timestep orders and the
    # adaptive run evaluates a subset of the exhaustive run's samples: their difference is
    # what dropping classes early costs, not noise.
    if exhaustive_per_class > 0:
        pick = np.concatenate([np.flatnonzero(data.labels == c)[:exhaustive_per_class]
                               for c in range(len(CLASS_NAMES))])
        x_pick, y_pick = images_to_tensor(data.images[pick]), data.labels[pick]
        s_ad = score_cells(unet, model_config, x_pick, config,
                           torch.Generator("cpu").manual_seed(seed))
        t0 = time.monotonic()
        s_ex = score_cells(unet, model_config, x_pick, config,
                           torch.Generator("cpu").manual_seed(seed), adaptive=False)
        wall_ex = time.monotonic() - t0
        p_ex = diffusion_predictions(s_ex, calibration)
        right_ex = p_ex.label == y_pick
        right_ad = diffusion_predictions(s_ad, calibration).label == y_pick
        diffusion["exhaustive"] = {
            "cells": len(pick),
            "accuracy": float(right_ex.mean()),
            "adaptive_accuracy_same_cells": float(right_ad.mean()),
            "cells_right_only_exhaustive": int(np.sum(right_ex & ~right_ad)),
            "cells_right_only_adaptive": int(np.sum(right_ad & ~right_ex)),
            "balanced_accuracy": balanced_accuracy(y_pick, p_ex.label, len(CLASS_NAMES)),
            "cells_per_s": len(pick) / wall_ex,
            "unet_evals_per_cell": float(s_ex.unet_evals.mean()),
            "adaptive_unet_evals_per_cell_same_cells": float(s_ad.unet_evals.mean()),
        }

    # CNN baseline: the whole test split, the same aml_dev images.
    cnn_model = load_baseline(weights_dir / BASELINE_WEIGHTS)
    cnn_data = test_all
    if cnn_model.config.image_size != size:
        cnn_data = load_images(data_dir, test_rows_all, cnn_model.config.image_size)
    t0 = time.monotonic()
    pc = predict_baseline(cnn_model, images_to_tensor(cnn_data.images)).numpy().astype(np.float64)
    wall_c = time.monotonic() - t0
    c_pred = cnn_predictions(pc, calibration)
    cnn_sub = cnn_predictions(pc[same], calibration)
    c_blast = cnn_predictions(predict_baseline(cnn_model, images_to_tensor(blasts)).numpy()
                              .astype(np.float64), calibration)
    c_neut = cnn_predictions(predict_baseline(cnn_model, images_to_tensor(neutro)).numpy()
                             .astype(np.float64), calibration)
    cnn: dict[str, object] = {
        "pbc_test": _classification_metrics(c_pred, cnn_data.labels),
        "pbc_test_same_cells_as_diffusion": _classification_metrics(cnn_sub, data.labels),
        "anomaly_auroc_aml_blasts_vs_pbc_test": auroc(c_blast.anomaly_score, c_pred.anomaly_score),
        "anomaly_auroc_aml_blasts_vs_pbc_test_same_cells": auroc(c_blast.anomaly_score,
                                                                 cnn_sub.anomaly_score),
        "aml_blasts_flagged_abnormal": float(c_blast.abnormal.mean()),
        "aml_blasts_flagged_for_review": float(c_blast.review.mean()),
        "aml_blasts_labelled_as": _labelled_as(c_blast.label, CLASS_NAMES),
        "pbc_test_flagged_abnormal": float(c_pred.abnormal.mean()),
        "domain_shift_aml_neutrophil_accuracy": float(np.mean(c_neut.label == neutrophil)),
        **_same_lab_control(c_blast, c_neut, c_pred),
        "throughput": {"cells": len(test_rows_all), "cells_per_s": len(test_rows_all) / wall_c,
                       "unet_evals_per_cell": 0.0, "threads": torch.get_num_threads()},
    }
    if arrays_out is not None:
        np.savez_compressed(arrays_out, labels=data.labels, d_prob=pred.probabilities,
                            d_unc=pred.uncertainty, d_anom=pred.anomaly_score,
                            d_anom_blast=p_blast.anomaly_score, d_anom_neut=p_neut.anomaly_score,
                            c_labels=cnn_data.labels, c_prob=pc, c_anom_blast=c_blast.anomaly_score,
                            c_anom_neut=c_neut.anomaly_score,
                            paths=np.array(data.paths))
    return {
        "model": diffusion_metadata_summary(metadata),
        "classifier_config": config.to_dict(),
        "data": {"pbc_test_cells_diffusion": len(rows), "pbc_test_per_class": per_class,
                 "pbc_test_cells_cnn": len(test_rows_all), "aml_blasts": len(blasts),
                 "aml_neutrophils": len(neutro), "seed": seed},
        "diffusion": diffusion,
        "cnn": cnn,
    }


def evaluate_heldout(weights_dir: Path, data_dir: Path, heldout: str, config: ClassifierConfig | None,
                     *, per_class: int, heldout_limit: int, seed: int) -> dict[str, object]:
    """Leave-one-class-out: how well the anomaly scores of models trained without
    ``heldout`` separate its PBC test cells from the test cells of the classes they know.

    ``weights_dir`` holds the diffusion model and the CNN trained without that class
    (``--exclude-class``), calibrated on val cells of the other classes only.

    Parameters
    ----------
    per_class:
        Test cells per known class for the diffusion model (0: all); the CNN scores all.
    heldout_limit:
        Test cells of the held-out class for the diffusion model (0: all); the CNN scores all.
    """
    calibration = read_calibration(weights_dir)
    if config is None:
        config = ClassifierConfig.from_calibration(dict(calibration["classifier_config"]))  # type: ignore[call-overload]
    unet, model_config, metadata = load_diffusion(weights_dir / DIFFUSION_WEIGHTS, config.device)
    names = model_config.class_names
    if heldout in names:
        raise CheckpointError(f"{weights_dir} was trained on {heldout}: it is not held out")
    size = model_config.image_size
    known_all = read_split(data_dir, "test", names)
    novel_all = read_split(data_dir, "test", (heldout,))
    # Every test cell is read once: the diffusion model scores a subset, the CNN all of them.
    known_data = load_images(data_dir, known_all, size)
    novel_data = load_images(data_dir, novel_all, size)
    same_known = _positions(known_all, stratified_rows(known_all, per_class, seed))
    same_novel = _positions(novel_all, stratified_rows(novel_all, heldout_limit, seed))
    known, novel = known_data.take(same_known), novel_data.take(same_novel)
    generator = torch.Generator("cpu").manual_seed(seed)
    t0 = time.monotonic()
    s_known = score_cells(unet, model_config, images_to_tensor(known.images), config, generator)
    s_novel = score_cells(unet, model_config, images_to_tensor(novel.images), config, generator)
    wall = time.monotonic() - t0
    log.info("heldout %s: %d + %d cells in %.0f s", heldout, len(same_known), len(same_novel), wall)
    p_known = diffusion_predictions(s_known, calibration)
    p_novel = diffusion_predictions(s_novel, calibration)

    diffusion = {
        "known_test": _classification_metrics(p_known, known.labels, names),
        "anomaly_auroc_heldout_vs_known": auroc(p_novel.anomaly_score, p_known.anomaly_score),
        # The same separation by the posterior's uncertainty (for the CNN the two scores are one).
        "uncertainty_auroc_heldout_vs_known": auroc(p_novel.uncertainty, p_known.uncertainty),
        "heldout_flagged_abnormal": float(p_novel.abnormal.mean()),
        "known_flagged_abnormal": float(p_known.abnormal.mean()),
        "heldout_flagged_for_review": float(p_novel.review.mean()),
        "heldout_labelled_as": _labelled_as(p_novel.label, names),
        "cells_per_s": (len(same_known) + len(same_novel)) / wall,
    }
    cnn_model = _load_cnn(weights_dir, names)
    c_known_data, c_novel_data = known_data, novel_data
    if cnn_model.config.image_size != size:
        c_known_data = load_images(data_dir, known_all, cnn_model.config.image_size)
        c_novel_data = load_images(data_dir, novel_all, cnn_model.config.image_size)
    pk = predict_baseline(cnn_model, images_to_tensor(c_known_data.images)).numpy().astype(np.float64)
    pn = predict_baseline(cnn_model, images_to_tensor(c_novel_data.images)).numpy().astype(np.float64)
    c_known, c_novel = cnn_predictions(pk, calibration), cnn_predictions(pn, calibration)
    cnn = {
        "known_test": _classification_metrics(c_known, c_known_data.labels, names),
        "anomaly_auroc_heldout_vs_known": auroc(c_novel.anomaly_score, c_known.anomaly_score),
        "anomaly_auroc_heldout_vs_known_same_cells": auroc(c_novel.anomaly_score[same_novel],
                                                           c_known.anomaly_score[same_known]),
        "heldout_flagged_abnormal": float(c_novel.abnormal.mean()),
        "known_flagged_abnormal": float(c_known.abnormal.mean()),
        "heldout_flagged_for_review": float(c_novel.review.mean()),
        "heldout_labelled_as": _labelled_as(c_novel.label, names),
    }
    return {
        "model": diffusion_metadata_summary(metadata),
        "heldout_class": heldout,
        "classes": list(names),
        "classifier_config": config.to_dict(),
        "data": {"known_test_cells_diffusion": len(same_known), "heldout_test_cells_diffusion":
                 len(same_novel), "known_test_cells_cnn": len(known_all),
                 "heldout_test_cells_cnn": len(novel_all), "per_class": per_class, "seed": seed},
        "diffusion": diffusion,
        "cnn": cnn,
    }
