"""Uncertainty, calibration and the metrics that judge them (numpy only).

Everything here works on probability vectors and scores, whichever model made
them, so the diffusion classifier and the CNN baseline are judged by the same code.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of each row of ``p`` divided by ``log(C)``: 0 certain, 1 uniform."""
    q = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(q)).sum(axis=1) / np.log(p.shape[1])


def margin(p: np.ndarray) -> np.ndarray:
    """Top probability minus runner-up probability of each row."""
    top2 = np.sort(p, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def fit_beta(deltas: np.ndarray, labels: np.ndarray) -> float:
    """Inverse temperature of ``softmax(-beta * delta)`` that minimises the NLL.

    A log-spaced grid search refined once; ``deltas`` are the paired error
    differences of :func:`analysis.classify.error_deltas` on the val split.
    """
    def nll(beta: float) -> float:
        logits = -beta * deltas
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(labels)), labels].mean())

    grid = np.logspace(-1, 6, 141)
    best = float(grid[np.argmin([nll(b) for b in grid])])
    fine = best * np.logspace(-0.05, 0.05, 21)
    return float(fine[np.argmin([nll(b) for b in fine])])


def review_threshold(uncertainty: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """Largest uncertainty threshold whose accepted cells meet ``target_error``.

    Cells with ``uncertainty <= threshold`` are accepted, the rest flagged for
    review. Returns the threshold that accepts the most cells while the error
    among accepted cells stays at or below the target; ``-inf`` (flag
    everything) if even the most certain cell is wrong.
    """
    if not 0.0 <= target_error < 1.0:
        raise ValueError("target_error must lie in [0, 1)")
    order = np.argsort(uncertainty, kind="stable")
    u = uncertainty[order]
    wrong = np.cumsum(~correct[order])
    n = np.arange(1, len(u) + 1)
    ok = wrong / n <= target_error
    # Only thresholds between distinct values can be chosen.
    distinct = np.r_[u[1:] != u[:-1], True]
    candidates = np.flatnonzero(ok & distinct)
    if candidates.size == 0:
        return float("-inf")
    return float(u[candidates[-1]])


def balanced_accuracy(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    recalls = per_class_recall(labels, pred, n_classes)
    return float(np.nanmean(recalls))


def per_class_recall(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            out[c] = float(np.mean(pred[mask] == c))
    return out


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence, equal-width bins."""
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(ece)


def reliability_table(p: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Per-bin confidence, accuracy and count for a reliability diagram."""
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = bins == b
        rows.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": int(mask.sum()),
                     "confidence": float(conf[mask].mean()) if mask.any() else float("nan"),
                     "accuracy": float(correct[mask].mean()) if mask.any() else float("nan")})
    return rows


def risk_coverage(uncertainty: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk at each coverage, accepting the most certain cells first."""
    order = np.argsort(uncertainty, kind="stable")
    wrong = np.cumsum(~correct[order])
    n = np.arange(1, len(order) + 1)
    return n / len(order), wrong / n


def aurc(uncertainty: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean selective risk over coverages)."""
    _, risk = risk_coverage(uncertainty, correct)
    return float(risk.mean())


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), higher score = positive."""
    scores = np.r_[scores_pos, scores_neg]
    ranks = rankdata(scores)
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
