"""The shipped classifiers with their calibration: diffusion model and CNN baseline.

``analysis/weights/`` holds ``cytodiffusion.safetensors`` (EMA weights of the
diffusion model), ``baseline_cnn.safetensors`` and ``calibration.json`` (the
posterior temperature, review and abnormal thresholds, and the per-class
anomaly normalisation, all fitted on the val split by
:func:`analysis.training.evaluate.calibrate`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from analysis.baseline import BaselineCNN, load_baseline, predict_baseline
from analysis.classes import CLASS_NAMES
from analysis.classify import (
    ClassifierConfig,
    DiffusionScores,
    anomaly_raw,
    error_deltas,
    images_to_tensor,
    load_diffusion,
    posterior,
    score_cells,
    timestep_grid,
)
from analysis.errors import CheckpointError
from analysis.uncertainty import entropy, margin

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIFFUSION_WEIGHTS = "cytodiffusion.safetensors"
BASELINE_WEIGHTS = "baseline_cnn.safetensors"
REFERENCE_WEIGHTS = "reference_effnet.safetensors"
CALIBRATION = "calibration.json"
#: The anomaly score a calibration's per-class normalisation belongs to (see
#: :func:`analysis.classify.anomaly_raw`).
ANOMALY_SCORE = "best_class_error"


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Per-cell outputs of a classifier (numpy arrays, one row per cell).

    ``uncertainty`` is the normalised entropy of the posterior for the diffusion
    model and ``1 - max softmax`` for the CNN; ``anomaly_score`` is the per-class
    z-score of :func:`analysis.classify.anomaly_raw` (diffusion) or ``1 - max softmax`` (CNN).
    """

    probabilities: np.ndarray
    label: np.ndarray
    uncertainty: np.ndarray
    margin: np.ndarray
    anomaly_score: np.ndarray
    review: np.ndarray
    abnormal: np.ndarray
    unet_evals: np.ndarray


def read_calibration(weights_dir: Path) -> dict[str, object]:
    path = weights_dir / CALIBRATION
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run `cytonode evaluate --calibrate` first")
    calibration = dict(json.loads(path.read_text()))
    # Files written before the field existed normalise this score.
    if calibration.get("anomaly_score", ANOMALY_SCORE) != ANOMALY_SCORE:
        raise CheckpointError(f"{path} normalises another anomaly score than this version's "
                              f"({ANOMALY_SCORE!r}): run `cytonode evaluate --calibrate` again")
    return calibration


def anomaly_reference(calibration: dict[str, object], timesteps: np.ndarray) -> np.ndarray:
    """The calibrated per-timestep reference error on the grid ``timesteps``.

    The reference was measured on the calibration's grid; scores on another grid (another
    budget or range, an experiment's override) get it interpolated, since it varies smoothly
    with the timestep. The thresholds stay those of the calibrated grid.
    """
    reference = np.asarray(calibration["anomaly_reference"], dtype=np.float64)
    calibrated = timestep_grid(ClassifierConfig.from_calibration(
        dict(calibration["classifier_config"]))).numpy()  # type: ignore[call-overload]
    if np.array_equal(calibrated, timesteps):
        return reference
    return np.asarray(np.interp(timesteps, calibrated, reference), dtype=np.float64)


def diffusion_predictions(scores: DiffusionScores, calibration: dict[str, object]) -> Predictions:
    """Turn raw denoising errors into posterior, uncertainty, anomaly score and flags."""
    deltas, best = error_deltas(scores.errors, scores.error_scale)
    p = posterior(deltas, float(calibration["beta"]))  # type: ignore[arg-type]
    u = entropy(p)
    raw = anomaly_raw(scores.errors, best, anomaly_reference(calibration, scores.timesteps))
    mean = np.asarray(calibration["anomaly_class_mean"], dtype=np.float64)
    std = np.asarray(calibration["anomaly_class_std"], dtype=np.float64)
    z = (raw - mean[best]) / std[best]
    return Predictions(
        probabilities=p, label=best, uncertainty=u, margin=margin(p), anomaly_score=z,
        review=u > float(calibration["review_threshold"]),  # type: ignore[arg-type]
        abnormal=z > float(calibration["abnormal_threshold"]),  # type: ignore[arg-type]
        unet_evals=scores.unet_evals,
    )


def cnn_predictions(p: np.ndarray, calibration: dict[str, object]) -> Predictions:
    """CNN softmax to predictions; ``1 - max softmax`` is uncertainty and anomaly score."""
    cnn = calibration.get("cnn", {})
    u = 1.0 - p.max(axis=1)
    return Predictions(
        probabilities=p, label=p.argmax(axis=1), uncertainty=u, margin=margin(p), anomaly_score=u,
        review=u > float(cnn["review_threshold"]) if cnn else np.zeros(len(p), bool),  # type: ignore[index]
        abnormal=u > float(cnn["abnormal_threshold"]) if cnn else np.zeros(len(p), bool),  # type: ignore[index]
        unet_evals=np.zeros(len(p), dtype=np.int64),
    )


def _require_all_classes(weights_dir: Path, names: tuple[str, ...]) -> None:
    """Refuse weights trained on a subset of the classes (leave-one-class-out runs)."""
    if names != CLASS_NAMES:
        missing = ", ".join(c for c in CLASS_NAMES if c not in names) or "the fixed class order"
        raise CheckpointError(f"{weights_dir} was trained without {missing} (leave-one-class-out): "
                              f"it is for `cytonode evaluate --heldout-class` only")


class DiffusionClassifier:
    """The shipped diffusion classifier: weights plus calibration.

    Parameters
    ----------
    weights_dir:
        Folder with the weights and ``calibration.json``.
    device:
        ``cpu`` or ``cuda``.
    """

    def __init__(self, weights_dir: Path = WEIGHTS_DIR, device: str = "cpu") -> None:
        self.calibration = read_calibration(weights_dir)
        self.unet, self.model_config, self.metadata = load_diffusion(
            weights_dir / DIFFUSION_WEIGHTS, device)
        self.config = ClassifierConfig.from_calibration(
            dict(self.calibration["classifier_config"]), device=device)  # type: ignore[call-overload]
        _require_all_classes(weights_dir, self.model_config.class_names)

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    def for_network(self, network: Mapping[str, torch.Tensor] | None) -> DiffusionClassifier:
        """This classifier, or for a site fine-tuned on its labelled cells (``calibrate-site
        --labelled``, by default: its ``network`` file holds a diffusion classifier,
        :func:`analysis.site_adapt.finetune_diffusion`) a copy with the site's UNet; the
        calibration and budget stay the shipped ones."""
        import copy

        from analysis.site_adapt import diffusion_state

        state = diffusion_state(network)
        if state is None:
            return self
        out = copy.copy(self)
        out.unet = copy.deepcopy(self.unet)
        try:
            out.unet.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"the site's diffusion classifier does not fit the shipped one: "
                                  f"{exc}") from exc
        return out

    def predict(self, images: np.ndarray, generator: torch.Generator, *,
                adaptive: bool = True) -> Predictions:
        """Classify framed ``uint8`` images ``(N, S, S, 3)``."""
        scores = score_cells(self.unet, self.model_config, images_to_tensor(images), self.config,
                             generator, adaptive=adaptive)
        return diffusion_predictions(scores, self.calibration)


class BaselineClassifier:
    """The shipped CNN baseline with its calibrated thresholds."""

    def __init__(self, weights_dir: Path = WEIGHTS_DIR) -> None:
        self.model: BaselineCNN = load_baseline(weights_dir / BASELINE_WEIGHTS)
        _require_all_classes(weights_dir, self.model.config.class_names)
        path = weights_dir / CALIBRATION
        self.calibration = read_calibration(weights_dir) if path.is_file() else {}

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def predict(self, images: np.ndarray) -> Predictions:
        p = predict_baseline(self.model, images_to_tensor(images)).numpy().astype(np.float64)
        return cnn_predictions(p, self.calibration)


class ReferenceClassifier:
    """The fine-tuned EfficientNet-Lite0 reference (:mod:`analysis.reference`) with its calibrated
    thresholds (``calibration.json``'s ``reference`` entry, when fitted).

    ``views``: the dihedral views its probabilities are averaged over; by default the review
    rule's (``reference_views``, chosen on val; 1 without a rule)."""

    def __init__(self, weights_dir: Path = WEIGHTS_DIR, views: int | None = None) -> None:
        from analysis.reference import load_reference

        self.model, self.config, self.metadata = load_reference(weights_dir / REFERENCE_WEIGHTS)
        _require_all_classes(weights_dir, self.config.class_names)
        path = weights_dir / CALIBRATION
        calibration = read_calibration(weights_dir) if path.is_file() else {}
        self.calibration = {"cnn": calibration["reference"]} if "reference" in calibration else {}
        rule = calibration.get("review_rule")
        self.views = int(views if views is not None else
                         rule.get("reference_views", 1) if isinstance(rule, dict) else 1)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        from analysis.reference import reference_logits, reference_posterior

        logits, _ = reference_logits(self.model, images, views=self.views)
        return reference_posterior(logits)

    def predict(self, images: np.ndarray) -> Predictions:
        return cnn_predictions(self.probabilities(images), self.calibration)
