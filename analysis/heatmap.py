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
    """Per-pixel evidence for ``predicted`` over ``runner_up``.

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
    size = model_config.image_size
    if tuple(image.shape) != (3, size, size):
        raise ValueError(f"image must have shape (3, {size}, {size}), not {tuple(image.shape)}")
    n_classes = len(model_config.class_names)
    if not (0 <= predicted < n_classes and 0 <= runner_up < n_classes) or predicted == runner_up:
        raise ValueError("predicted and runner_up must be two different class indices")
    grid = timestep_grid(config)
    n_t = len(grid)
    alphas = build_scheduler(model_config).alphas_cumprod.to(torch.float32)
    noise = torch.randn(n_t, 3, size, size, generator=generator)
    a = alphas[grid].view(-1, 1, 1, 1)
    noisy = a.sqrt() * image.float()[None] + (1.0 - a).sqrt() * noise
    device = torch.device(config.device)
    heat = torch.zeros(size, size)
    for s in range(0, n_t, max(1, config.unet_batch // 2)):
        e = slice(s, s + max(1, config.unet_batch // 2))
        x = torch.cat([noisy[e], noisy[e]])
        t = torch.cat([grid[e], grid[e]])
        labels = torch.tensor([predicted] * len(grid[e]) + [runner_up] * len(grid[e]))
        pred = unet(x.to(device), t.to(device), class_labels=labels.to(device)).sample.float().cpu()
        err = ((pred - torch.cat([noise[e], noise[e]])) ** 2).mean(dim=1)  # (2k, S, S)
        k = len(grid[e])
        heat += (err[k:] - err[:k]).sum(dim=0)
    return (heat / n_t).numpy().astype(np.float32)


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
