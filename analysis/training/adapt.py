"""Adapting the classifiers to a site's colours and statistics, from its unlabelled cells.

Cheap, label-free adaptations, measured leave-one-lab-out by
:mod:`analysis.training.adaptation` (model card). None helped on both held-out labs on its
own, so the node uses none of them without labelled cells; the colour transfer is here, the
statistics' re-estimation in :mod:`analysis.site_adapt` (the node's, with labelled cells):

:class:`ColourTransfer`
    Reinhard et al.'s colour transfer (2001) in CIELAB: the mean and standard deviation
    of each channel over a site's cells are moved to those of the training cells. It
    changes only the colours a site's stain and scanner give, not the cell's shape.
:func:`analysis.site_adapt.adapt_batchnorm`
    Li et al.'s AdaBN (2016): the reference network's batch-normalisation statistics
    re-estimated on the site's cells, the weights unchanged.
:func:`analysis.site_adapt.balanced_adapt_batchnorm`
    AdaBN on the site's cells re-sampled so that every class the network predicts carries
    the same weight (the node uses it with labelled cells: :mod:`analysis.site_adapt`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


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
