"""The leave-one-lab-out measurement's own decisions (analysis.training.few_shot): the weight a
site's named cells choose for the diffusion classifier, and per-class offsets that undo a site's
bias. They chose nothing that ships, but the model card's figures rest on them."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.site_adapt import GATE_MARGIN
from analysis.training.few_shot import apply_log_offsets, choose_diffusion_weight, fit_log_offsets


def _posteriors(calls: np.ndarray, mass: float = 0.8, classes: int = 8) -> np.ndarray:
    p = np.full((len(calls), classes), (1.0 - mass) / (classes - 1))
    p[np.arange(len(calls)), calls] = mass
    return p


def test_the_shipped_weight_stays_unless_another_is_clearly_better() -> None:
    labels = np.repeat(np.arange(4), 10)
    right = _posteriors(labels)
    # both models right on every named cell: every weight ties, the rule's weight is kept
    same = choose_diffusion_weight(right, right, labels, 0.3)
    assert same.weight == 0.3 and set(same.scores.values()) == {1.0}
    # the site network calls class 3 class 2; the diffusion model is right and sure of it, so
    # giving it weight repairs class 3: a weight above the rule's beats it by more than the margin
    wrong_3 = _posteriors(np.where(labels == 3, 2, labels), mass=0.6)
    sure = _posteriors(labels, mass=0.99)
    chosen = choose_diffusion_weight(sure, wrong_3, labels, 0.0)
    assert chosen.weight > 0.0
    assert chosen.scores[chosen.weight] >= chosen.scores[0.0] + GATE_MARGIN


def test_log_offsets_undo_a_sites_bias_toward_one_class() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 12)
    # this site's neutrophils (0) lean to eosinophil (1): 0.45 against 0.35 on every one
    p = _posteriors(labels, mass=0.9)
    p[labels == 0, 0], p[labels == 0, 1] = 0.35, 0.45
    p = p * rng.uniform(0.95, 1.05, p.shape)
    p /= p.sum(axis=1, keepdims=True)
    assert np.mean(p[labels == 0].argmax(1) == 0) == 0.0
    offsets = fit_log_offsets(p, labels)
    fixed = apply_log_offsets(p, offsets)
    assert np.allclose(fixed.sum(axis=1), 1.0)
    assert np.mean(fixed.argmax(1) == labels) == 1.0  # the neutrophils now read right, and the rest still
    assert offsets[0] > offsets[1]
    assert offsets[5:].tolist() == [0.0, 0.0, 0.0]  # classes without a named cell are left alone


def test_verify_folds_needs_the_pack_and_the_diffusion_classifier(capsys: pytest.CaptureFixture[str]) -> None:
    """`few_shot --verify-folds` fits the site network and reads the named cells with the
    diffusion classifier: without either it stops at once with a usage error that says so."""
    from analysis.training.few_shot import main

    with pytest.raises(SystemExit) as stop:
        main(["--lab", "chula", "--reference", "ref.safetensors", "--verify-folds"])
    assert stop.value.code == 2
    assert "--verify-folds needs --pack and --diffusion" in capsys.readouterr().err
