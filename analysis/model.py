"""The class-conditional denoising diffusion model (CytoDiffusion, small).

The model is a diffusers :class:`~diffusers.UNet2DModel` with one class
embedding per cell class and a diffusers DDPM noise scheduler, in pixel space (a latent
space was measured against it: ``bench/latent_vs_pixel.py``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from analysis.classes import CLASS_NAMES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and noise schedule of the diffusion model.

    Parameters
    ----------
    image_size:
        Side of the square input: pixels, or latent positions in latent space.
    block_out_channels:
        Channels of each UNet resolution level.
    layers_per_block:
        ResNet layers in each down block.
    attention_levels:
        Indices of the levels that use self-attention.
    num_train_timesteps:
        Length of the DDPM noise schedule.
    beta_schedule:
        diffusers name of the beta schedule.
    """

    image_size: int = 48
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = (3,)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    class_names: tuple[str, ...] = CLASS_NAMES
    #: "scale_shift": time and class embeddings scale and shift the normalised features (FiLM).
    #: With the additive "default", GroupNorm with one channel a group (level 0 here) removes the
    #: per-channel offset the embedding adds, so the class condition had no effect at that level.
    resnet_time_scale_shift: str = "scale_shift"
    #: Channels of the input the model denoises: 3 for RGB pixels (the shipped model), an
    #: autoencoder's latent channels in latent space (``bench/latent_vs_pixel.py``).
    in_channels: int = 3
    #: Radius of the cell disc as a fraction of the frame side: the denoising error is measured
    #: (in training and in classification) with full weight inside it and none outside it, so
    #: the red cells and glass around a cell, which differ most between labs, do not vote.
    #: 0: the whole frame (weights written before the field).
    cell_disc: float = 0.0

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 2:
            raise ValueError("block_out_channels needs at least two levels")
        if self.image_size % (2 ** (levels - 1)) != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**{levels - 1}"
            )
        if any(not 0 <= i < levels for i in self.attention_levels):
            raise ValueError("attention_levels must index block_out_channels")
        if any(c % min(32, self.block_out_channels[0]) for c in self.block_out_channels):
            raise ValueError("every block_out_channels entry must be divisible by the first (max 32)")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError("resnet_time_scale_shift must be 'default' or 'scale_shift'")
        if self.in_channels < 1:
            raise ValueError("in_channels must be positive")
        if not 0.0 <= self.cell_disc <= 0.75:
            raise ValueError("cell_disc must lie in [0, 0.75]")
        if self.num_train_timesteps < 10:
            raise ValueError("num_train_timesteps must be at least 10")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw: dict[str, Any] = json.loads(text)
        for key in ("block_out_channels", "attention_levels", "class_names"):
            raw[key] = tuple(raw[key])
        raw.setdefault("resnet_time_scale_shift", "default")  # weights written before the field
        raw.setdefault("cell_disc", 0.0)
        return cls(**raw)


def cell_weight(config: ModelConfig) -> torch.Tensor:
    """``(S, S)`` weights of the denoising error: a disc of radius ``cell_disc`` x S with a
    one-pixel soft edge, or ones when ``cell_disc`` is 0."""
    s = config.image_size
    if config.cell_disc == 0.0:
        return torch.ones(s, s)
    return disc_weight(s, config.cell_disc)


def disc_weight(size: int, radius: float) -> torch.Tensor:
    """``(size, size)`` ones inside a disc of ``radius`` x ``size`` around the centre, zeros
    outside, with a one-pixel soft edge."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) - size / 2
    r = torch.sqrt(c.view(-1, 1) ** 2 + c.view(1, -1) ** 2)
    return (radius * size + 0.5 - r).clamp(0.0, 1.0)


def build_unet(config: ModelConfig) -> UNet2DModel:
    """Build the class-conditional UNet described by ``config``."""
    levels = len(config.block_out_channels)
    down = tuple(
        "AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D"
        for i in range(levels)
    )
    up = tuple(
        "AttnUpBlock2D" if (levels - 1 - i) in config.attention_levels else "UpBlock2D"
        for i in range(levels)
    )
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=len(config.class_names),
        norm_num_groups=min(32, config.block_out_channels[0]),  # divides every level
        attention_head_dim=32,
        resnet_time_scale_shift=config.resnet_time_scale_shift,
    )


def build_scheduler(config: ModelConfig) -> DDPMScheduler:
    """Build the DDPM noise scheduler used in training and classification."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type="epsilon",
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What :func:`optimisation_step` reads of a training's configuration (the fields of the
    same names of :class:`analysis.training.train.TrainConfig`)."""

    learning_rate: float
    warmup_steps: int = 1
    t_min: int = 0
    bf16: bool = False
    min_snr_gamma: float = 0.0
    ema_decay: float = 0.999


def optimisation_step(model: torch.nn.Module, ema: torch.nn.Module, optimiser: torch.optim.Optimizer,
                      alphas: torch.Tensor, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                      *, step: int, train: StepSettings, t_high: int,
                      pixel_weight: torch.Tensor | None = None) -> float:
    """One step of denoising training on the batch ``x`` (labels ``y``); returns the loss.

    Noise and timesteps (uniform on ``[train.t_min, t_high)``) are drawn from ``generator``; the
    learning rate warms up linearly over ``train.warmup_steps``; the EMA copy follows with
    ``train.ema_decay`` (``train``: the training's
    :class:`analysis.training.train.TrainConfig`, or a site fine-tune's :class:`StepSettings`). ``pixel_weight`` ``(S, S)`` weighs the squared error by pixel (the cell
    disc of :func:`analysis.model.cell_weight`); min-SNR weighting when ``train.min_snr_gamma``.
    """
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    t = torch.randint(train.t_min, t_high, (x.shape[0],), generator=generator).to(x.device)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x + (1 - a).sqrt() * noise
    lr = train.learning_rate * min(1.0, (step + 1) / train.warmup_steps)
    for group in optimiser.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=train.bf16):
        pred = model(noisy, t, class_labels=y).sample
    sq = (pred.float() - noise) ** 2
    if pixel_weight is not None:
        per_sample = (sq * pixel_weight).sum(dim=(1, 2, 3)) / (pixel_weight.sum() * sq.shape[1])
    else:
        per_sample = sq.mean(dim=(1, 2, 3))
    if train.min_snr_gamma > 0:
        snr = alphas[t] / (1.0 - alphas[t])
        per_sample = per_sample * snr.clamp(max=train.min_snr_gamma) / snr
    loss = per_sample.mean()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()
    decay = min(train.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)
    return float(loss.detach())
