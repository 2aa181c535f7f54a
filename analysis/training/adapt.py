"""Adapting the classifiers to a site's colours and statistics, from its unlabelled cells.

Two cheap, label-free adaptations, measured leave-one-lab-out by
:mod:`analysis.training.adaptation` (model card). Neither helped on both held-out labs,
so the node does not use them; they stay here with the measurement:

:class:`ColourTransfer`
    Reinhard et al.'s colour transfer (2001) in CIELAB: the mean and standard deviation
    of each channel over a site's cells are moved to those of the training cells. It
    changes only the colours a site's stain and scanner give, not the cell's shape.
:func:`adapt_batchnorm`
    Li et al.'s AdaBN (2016): the reference network's batch-normalisation statistics
    re-estimated on the site's cells, the weights unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


def _lab(images: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), not {images.dtype} {images.shape}")
    return np.asarray(rgb2lab(images.reshape(-1, images.shape[2], 3)), dtype=np.float64)


def lab_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of L*, a*, b* over every pixel of ``images``."""
    lab = _lab(images).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


@dataclasses.dataclass(frozen=True)
class ColourTransfer:
    """Map a site's CIELAB moments (``site_*``) onto the training cells' (``target_*``)."""

    site_mean: tuple[float, float, float]
    site_std: tuple[float, float, float]
    target_mean: tuple[float, float, float]
    target_std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name in ("site_mean", "site_std", "target_mean", "target_std"):
            values = getattr(self, name)
            if len(values) != 3 or not np.all(np.isfinite(values)):
                raise ValueError(f"{name} must be three finite numbers, not {values!r}")
        if min(self.site_std) <= 0 or min(self.target_std) <= 0:
            raise ValueError("standard deviations must be positive")

    @classmethod
    def fit(cls, site_images: np.ndarray, target_images: np.ndarray) -> ColourTransfer:
        sm, ss = lab_moments(site_images)
        tm, ts = lab_moments(target_images)
        return cls.from_moments(sm, ss, tm, ts)

    @classmethod
    def from_moments(cls, site_mean: Any, site_std: Any, target_mean: Any,
                     target_std: Any) -> ColourTransfer:
        def three(v: Any) -> tuple[float, float, float]:
            a = [float(x) for x in v]
            return (a[0], a[1], a[2])

        return cls(three(site_mean), three(site_std), three(target_mean), three(target_std))

    def apply(self, images: np.ndarray) -> np.ndarray:
        """The images in the training cells' colours (uint8, same shape)."""
        from skimage.color import lab2rgb

        if len(images) == 0:
            return images.copy()
        lab = _lab(images)
        scale = np.asarray(self.target_std) / np.asarray(self.site_std)
        lab = (lab - np.asarray(self.site_mean)) * scale + np.asarray(self.target_mean)
        lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
        rgb = lab2rgb(lab)
        out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        return out.reshape(images.shape)

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ColourTransfer:
        return cls.from_moments(raw["site_mean"], raw["site_std"], raw["target_mean"],
                                raw["target_std"])


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> int:
    """Re-estimate ``model``'s batch-norm running statistics on ``images`` (uint8 ``(N, S, S, 3)``,
    framed for the reference), in place; the weights are unchanged. Returns the layers adapted."""
    from analysis.reference import to_input

    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no batch-normalisation layers")
    if len(images) < 2:
        raise ValueError("adapting batch-norm statistics needs at least 2 cells")
    saved = [(m.momentum, m.training) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if len(batch) < 2:  # a batch of one has no variance; fold it into the previous
                break
            model.extract_features(to_input(batch))
    finally:
        for m, (momentum, training) in zip(layers, saved):
            m.momentum = momentum
            m.train(training)
        model.eval()
    return len(layers)


def batchnorm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every batch-norm layer (what :func:`adapt_batchnorm` changes)."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}
