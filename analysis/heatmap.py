"""Counterfactual heatmaps: where the predicted class explains a cell better than the runner-up.

For one cell we add the same noise at the same timesteps, let the UNet predict
it under the predicted class and under the runner-up class, and average the
per-pixel difference of their squared errors over the timesteps:
``heat = mean_t (err_runner_up - err_predicted)``. Positive values mark the
pixels that speak for the predicted class, negative ones the runner-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from matplotlib import colormaps
from PIL import Image

from analysis.classify import ClassifierConfig, timestep_grid
from analysis.model import ModelConfig, build_scheduler


@torch.no_grad()
def counterfactual_heatmap(
    unet: UNet2DModel,
    model_config: ModelConfig,
    image: torch.Tensor,
    predicted: int,
    runner_up: int,
    config: ClassifierConfig,
    generator: torch.Generator,
) -> np.ndarray:
    """Per-pixel evidence for ``predicted`` over ``runner_up`` for one cell.

    Parameters
    ----------
    image:
        ``(3, S, S)`` in ``[-1, 1]``.
    predicted, runner_up:
        Class indices.
    config:
        Its timestep grid is used (every grid timestep, paired noise).
    generator:
        Source of the noise (CPU).

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(S, S)``, error difference averaged over colour channels and timesteps.
    """
    return counterfactual_heatmaps(unet, model_config, image[None], [predicted], [runner_up],
                                   config, generator)[0]


@torch.no_grad()
def counterfactual_heatmaps(
    unet: UNet2DModel,
    model_config: ModelConfig,
    images: torch.Tensor,
    predicted: list[int] | np.ndarray,
    runner_up: list[int] | np.ndarray,
    config: ClassifierConfig,
    generator: torch.Generator,
) -> np.ndarray:
    """:func:`counterfactual_heatmap` of many cells, batched across cells into UNet calls of at most
    ``config.unet_batch`` images. The noise is drawn cell after cell from ``generator``, so the result
    equals calling :func:`counterfactual_heatmap` on each cell in turn.

    Returns
    -------
    numpy.ndarray
        ``float32`` ``(N, S, S)``.
    """
    size = model_config.image_size
    n = int(images.shape[0])
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"images must have shape (N, 3, {size}, {size}), not {tuple(images.shape)}")
    if len(predicted) != n or len(runner_up) != n:
        raise ValueError("predicted and runner_up need one class index per image")
    n_classes = len(model_config.class_names)
    for p, r in zip(predicted, runner_up):
        if not (0 <= p < n_classes and 0 <= r < n_classes) or p == r:
            raise ValueError("predicted and runner_up must be two different class indices")
    grid = timestep_grid(config)
    n_t = len(grid)
    alphas = build_scheduler(model_config).alphas_cumprod.to(torch.float32)
    a = alphas[grid].view(-1, 1, 1, 1)
    device = torch.device(config.device)
    out = np.zeros((n, size, size), dtype=np.float32)
    per_call = max(1, config.unet_batch // (2 * n_t))  # cells per UNet call
    for start in range(0, n, per_call):
        cells = range(start, min(n, start + per_call))
        noise = torch.stack([torch.randn(n_t, 3, size, size, generator=generator) for _ in cells])
        noisy = a.sqrt()[None] * images[start:start + len(cells)].float()[:, None] \
            + (1.0 - a).sqrt()[None] * noise  # (k, T, 3, S, S)
        k = len(cells)
        x = torch.cat([noisy, noisy]).reshape(2 * k * n_t, 3, size, size)
        t = grid.repeat(2 * k)
        labels = torch.tensor([int(predicted[c]) for c in cells for _ in range(n_t)]
                              + [int(runner_up[c]) for c in cells for _ in range(n_t)])
        pred = unet(x.to(device), t.to(device), class_labels=labels.to(device)).sample.float().cpu()
        err = ((pred.reshape(2, k, n_t, 3, size, size) - noise[None]) ** 2).mean(dim=3)  # (2,k,T,S,S)
        out[start:start + k] = (err[1] - err[0]).mean(dim=1).numpy()
    return out


def overlay_png(image: np.ndarray, heat: np.ndarray, path: Path, *, scale: int = 4,
                alpha: float = 0.5) -> None:
    """Write the heatmap over the cell image as a PNG.

    Parameters
    ----------
    image:
        ``uint8`` ``(S, S, 3)`` (the framed cell).
    heat:
        ``(S, S)`` from :func:`counterfactual_heatmap`; shown with a diverging
        colour map symmetric around 0 (red: predicted class, blue: runner-up).
    scale:
        Upsampling factor of the written PNG.
    """
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and heat {heat.shape} differ in size")
    limit = float(np.percentile(np.abs(heat), 99)) or 1.0  # a few extreme pixels do not wash out the rest
    heat = np.clip(heat, -limit, limit)
    coloured = colormaps["coolwarm"]((heat / limit + 1.0) / 2.0)[..., :3]
    blend = (1.0 - alpha) * image.astype(np.float64) / 255.0 + alpha * coloured
    out = Image.fromarray((blend * 255.0).round().astype(np.uint8))
    side = image.shape[0] * scale
    out.resize((side, side), Image.Resampling.NEAREST).save(path)
