"""Uncertainty metrics, calibration helpers and the per-lab evaluation's seeds."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.model import ModelConfig
from analysis.training.evaluate import stratified_rows
from analysis.uncertainty import (
    aurc,
    auroc,
    balanced_accuracy,
    entropy,
    expected_calibration_error,
    fit_beta,
    margin,
    per_class_recall,
    review_threshold,
)
from dicom_node.app import commands

from .conftest import DATA


def test_entropy_and_margin() -> None:
    p = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.2, 0.0]])
    np.testing.assert_allclose(entropy(p)[:2], [0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(margin(p), [1.0, 0.0, 0.2])


def test_review_threshold_meets_target() -> None:
    rng = np.random.default_rng(0)
    u = rng.random(1000)
    correct = rng.random(1000) > u * 0.2  # more errors at high uncertainty
    thr = review_threshold(u, correct, 0.01)
    accepted = u <= thr
    assert accepted.any()
    assert (~correct[accepted]).mean() <= 0.01
    # The next larger threshold would break the target.
    nxt = np.sort(u[u > thr])[0]
    assert (~correct[u <= nxt]).mean() > 0.01
    assert review_threshold(np.array([0.1, 0.2]), np.array([False, True]), 0.01) == float("-inf")
    with pytest.raises(ValueError):
        review_threshold(u, correct, 1.5)


def test_metrics_on_known_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    assert balanced_accuracy(labels, pred, 3) == pytest.approx(0.75)
    np.testing.assert_allclose(per_class_recall(labels, pred, 3), [0.5, 1.0, np.nan])
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    p = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(p, np.array([0, 1])) == pytest.approx(0.4)
    # Errors accepted last: risk is 0 until the last cell.
    assert aurc(np.array([0.1, 0.2, 0.9]), np.array([True, True, False])) == pytest.approx(1 / 9)


def test_fit_beta_recovers_temperature() -> None:
    rng = np.random.default_rng(1)
    deltas = rng.random((4000, 4)) * 0.01
    true_beta = 300.0
    logits = -true_beta * deltas
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])
    assert fit_beta(deltas, labels) == pytest.approx(true_beta, rel=0.2)


def test_stratified_rows() -> None:
    rows = [(f"{c}_{i}", c) for c in range(8) for i in range(5)]
    sub = stratified_rows(rows, 2, seed=0)
    assert len(sub) == 16 and sorted({c for _, c in sub}) == list(range(8))
    assert sub == stratified_rows(rows, 2, seed=0)
    assert stratified_rows(rows, 0, seed=0) == rows


def test_cli_defaults_match_model_config() -> None:
    assert commands.DEFAULT_IMAGE_SIZE == ModelConfig.image_size
    assert commands.DEFAULT_CHANNELS == ModelConfig.block_out_channels


@pytest.mark.skipif(not (DATA / "bccd").is_dir(), reason="BCCD not present")
def test_evaluate_labs_reports_every_seed_and_the_spread(tmp_path) -> None:
    """`evaluate_labs --seeds` scores once per seed and reports each run and the spread (the
    diffusion classifier's noise draws move its calls on the same cells). The reference, run
    here, draws no noise, so its spread is nil; the spread itself on runs that differ."""
    import json
    import subprocess
    import sys

    from analysis.training.evaluate_labs import spread

    out = tmp_path / "seeds.json"
    run = subprocess.run([sys.executable, "-m", "analysis.training.evaluate_labs", "--split", "test",
                          "--labs", "bccd", "--models", "reference", "--seeds", "0,3",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["seeds"] == [0, 3] and set(result["runs"]) == {"0", "3"}
    row = result["spread"]["reference"]["bccd"]
    one = result["runs"]["0"]["reference"]["bccd"]["balanced_accuracy"]
    assert row["balanced_accuracy_min"] == row["balanced_accuracy_max"] == one > 0.5
    # the spread of runs that differ: mean, lowest and highest of each
    runs = {s: {"diffusion": {"bccd": {"balanced_accuracy": b, "accuracy": a}}}
            for s, (b, a) in enumerate([(0.6, 0.8), (0.9, 0.95), (0.75, 0.9)])}
    got = spread(runs)["diffusion"]["bccd"]
    assert got == {"balanced_accuracy_mean": 0.75, "balanced_accuracy_min": 0.6,
                   "balanced_accuracy_max": 0.9, "accuracy_mean": 0.8833,
                   "accuracy_min": 0.8, "accuracy_max": 0.95}
