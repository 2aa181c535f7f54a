"""Training of the diffusion classifier (``cytonode train``).

Training is resumable: every ``checkpoint_every`` steps the model, its EMA
copy, the optimiser and the step count are written atomically to ``out_dir``;
running the same command again continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from analysis.augment import DEFAULT_SHIFT, augment
from analysis.errors import CheckpointError
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.model import (
    ModelConfig,
    build_scheduler,
    build_unet,
    cell_weight,
    count_parameters,
    optimisation_step,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "train_state.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train the diffusion model.

    Parameters
    ----------
    data_dir:
        The shared data folder (``pbc/``, ``bccd/``, ``chula_wbc/`` inside); the PBC folder
        itself is read as its parent.
    out_dir:
        Where checkpoints and the final weights go.
    steps:
        Total optimiser steps (a resumed run stops at the same total).
    labs:
        The labs whose train cells are used (:mod:`analysis.training.labs`); leave-one-lab-out
        runs leave one out.
    lab_share:
        Share of each batch drawn from PBC; the rest is spread evenly over the other labs.
        Within a lab, classes are drawn equally often (a class with fewer than 10 cells as if
        it had 10, so one cell is not repeated without end).
    init_weights:
        Start a new run from these exported weights (fine-tuning); ignored when resuming.
    min_snr_gamma:
        Min-SNR loss weighting (Hang et al. 2023, as CytoDiffusion trains): each timestep's
        epsilon loss is weighted by ``min(SNR, gamma) / SNR``; 0 switches it off.
    """

    data_dir: Path
    out_dir: Path
    steps: int = 20000
    batch_size: int = 64
    learning_rate: float = 2e-4
    warmup_steps: int = 500
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    checkpoint_every: int = 250
    threads: int = 0
    #: Train on timesteps ``[t_min, t_max)`` only (None: the whole schedule). The classifier scores
    #: timesteps in [125, 500) only (``ClassifierConfig``), so other ones are not needed.
    t_max: int | None = None
    t_min: int = 0
    labs: tuple[str, ...] = ("pbc",)
    lab_share: float = 0.5
    init_weights: Path | None = None
    #: The wider colour, contrast and blur ranges of :data:`analysis.augment.STRONG`
    #: (as ``reference_train --strong-augment``), for labs whose stain the standard ranges miss.
    strong_augment: bool = False
    min_snr_gamma: float = 0.0
    field_of_view_um: float = FIELD_OF_VIEW_UM
    #: Largest move of the cell off the frame's centre along each axis in training, in um
    #: (``None``: 3 % of half the frame, about 0.4 um), so that a detector's centre, not an
    #: annotator's, frames a cell the model knows.
    max_shift_um: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be positive")
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError("ema_decay must lie in (0, 1)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError("device must be 'cpu' or 'cuda'")
        if self.t_max is not None and self.t_max < 1:
            raise ValueError("t_max must be positive")
        if not 0 <= self.t_min < (self.t_max or 10**9):
            raise ValueError("t_min must lie in [0, t_max)")
        if not self.labs:
            raise ValueError("labs must name at least one lab")
        if not 0.0 < self.lab_share <= 1.0:
            raise ValueError("lab_share must lie in (0, 1]")
        if self.min_snr_gamma < 0:
            raise ValueError("min_snr_gamma must be >= 0")
        if self.max_shift_um is not None and not 0.0 <= self.max_shift_um <= self.field_of_view_um / 4:
            raise ValueError(f"max_shift_um must lie in [0, {self.field_of_view_um / 4:g}] (a quarter "
                             f"of the field of view), not {self.max_shift_um}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")


def _atomic_save(write: Callable[[Path], object], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, with days in front past 24 hours (``2d 03:04:05``)."""
    total = round(max(seconds, 0.0))
    days, rest = divmod(total, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def class_balanced_weights(labels: np.ndarray) -> torch.Tensor:
    """Sampling weights (for ``torch.multinomial``) that draw every class equally often."""
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
    return weights


def lab_class_weights(labs: np.ndarray, labels: np.ndarray, lab_share: float) -> torch.Tensor:
    """Sampling weights: ``lab_share`` of the draws from lab 0 (PBC), the rest evenly over the
    other labs; within a lab every class equally often (counted as at least 10 cells)."""
    lab_ids = [int(v) for v in np.unique(labs)]
    others = [v for v in lab_ids if v != 0]
    if 0 in lab_ids and others:
        shares = {0: lab_share, **{v: (1.0 - lab_share) / len(others) for v in others}}
    else:
        shares = {v: 1.0 / len(lab_ids) for v in lab_ids}
    weights = np.zeros(len(labels), dtype=np.float64)
    for lab in lab_ids:
        in_lab = labs == lab
        classes = np.unique(labels[in_lab])
        for c in classes:
            sel = in_lab & (labels == c)
            weights[sel] = shares[lab] / len(classes) / max(10, int(sel.sum()))
    return torch.as_tensor(weights, dtype=torch.float64)


def train_diffusion(train: TrainConfig, model_config: ModelConfig) -> dict[str, float | None]:
    """Train (or continue training) the class-conditional diffusion model.

    Returns
    -------
    dict
        Summary: steps done, wall time, final loss (the running mean; ``None`` when no step
        has ever been run in ``train.out_dir``).
    """
    if model_config.in_channels != 3:
        raise ValueError("train_diffusion trains the pixel-space model (3 channels); "
                         "a latent-space model is trained by bench/latent_vs_pixel.py")
    if train.threads:
        torch.set_num_threads(train.threads)
    out = train.out_dir
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(train.device)
    generator = torch.Generator("cpu").manual_seed(train.seed)

    model = build_unet(model_config).to(device)
    if train.init_weights is not None and not (out / STATE).exists():
        init = load_file(str(train.init_weights))
        model.load_state_dict(init)
        log.info("starting from the weights %s", train.init_weights)
    ema = build_unet(model_config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    scheduler = build_scheduler(model_config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=0.0)
    step = 0
    elapsed_before = 0.0
    # The running loss carries over a resume: a run resumed at its last step reports the loss it
    # stopped with; JSON never gets NaN (no step run in a fresh directory gives null).
    loss_avg = math.nan
    state_path = out / STATE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if ModelConfig.from_json(state["model_config"]) != model_config:
            raise CheckpointError(f"{out} holds a checkpoint of another model configuration")
        tensors = load_file(str(out / CHECKPOINT))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        if (out / OPTIMIZER).exists():
            optimiser.load_state_dict(torch.load(out / OPTIMIZER, map_location=device))
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if isinstance(state.get("loss"), (int, float)):
            loss_avg = float(state["loss"])
        generator.manual_seed(train.seed + step)
        log.info("resumed from step %d (%.0f s of training so far)", step, elapsed_before)
    log.info("model: %d parameters, %s", count_parameters(model), model_config.to_json())

    from analysis.training.labs import LABS, load_lab, load_pbc

    # The shared data folder, or the PBC folder itself (its labs' siblings beside it).
    is_pbc = (train.data_dir / "splits.csv").is_file()
    root = train.data_dir.parent if is_pbc else train.data_dir
    # Framed a third larger than the model's input, so that rotation and scale resample detail.
    load_size = model_config.image_size * 4 // 3
    parts = [load_pbc(train.data_dir, "train", load_size, train.field_of_view_um,
                      model_config.class_names) if lab == "pbc" and is_pbc else
             load_lab(root, lab, "train", load_size, train.field_of_view_um,
                      model_config.class_names) for lab in train.labs]
    for part in parts:
        log.info("%s: %d train cells", part.lab, len(part))
    images = torch.from_numpy(np.concatenate([p.images for p in parts])).permute(0, 3, 1, 2)
    images = images.contiguous()
    label_array = np.concatenate([p.labels for p in parts])
    labels = torch.from_numpy(label_array)
    lab_index = np.concatenate([np.full(len(p), LABS.index(p.lab)) for p in parts])
    weights = lab_class_weights(lab_index, label_array, train.lab_share)
    pixel_weight = cell_weight(model_config).to(device)

    alphas = scheduler.alphas_cumprod.to(device)
    t_high = min(train.t_max or model_config.num_train_timesteps, model_config.num_train_timesteps)
    t0 = time.monotonic()
    start_step = step

    def save() -> None:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
        _atomic_save(lambda p: save_file(tensors, str(p)), out / CHECKPOINT)
        _atomic_save(lambda p: torch.save(optimiser.state_dict(), p), out / OPTIMIZER)
        elapsed = elapsed_before + time.monotonic() - t0
        text = json.dumps({"step": step, "elapsed_s": elapsed, "loss": _finite(loss_avg),
                           "model_config": model_config.to_json(),
                           "train_config": {k: str(v) for k, v in dataclasses.asdict(train).items()}})
        _atomic_save(lambda p: p.write_text(text), state_path)

    shift = (DEFAULT_SHIFT if train.max_shift_um is None
             else train.max_shift_um / (train.field_of_view_um / 2))
    model.train()
    while step < train.steps:
        idx = torch.multinomial(weights, train.batch_size, replacement=True, generator=generator)
        x = images[idx].float().div_(255.0)
        x = augment(x, generator, model_config.image_size, strong=train.strong_augment,
                    shift=shift).mul_(2.0).sub_(1.0).to(device)
        y = labels[idx].to(device)
        value = optimisation_step(model, ema, optimiser, alphas, x, y, generator, step=step,
                                  train=train, t_high=t_high, pixel_weight=pixel_weight)
        step += 1
        loss_avg = value if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * value
        if step % 50 == 0 or step == train.steps:
            rate = (step - start_step) / max(time.monotonic() - t0, 1e-9)
            eta = (train.steps - step) / max(rate, 1e-9)
            log.info("step %d/%d loss %.4f  %.2f steps/s  ETA %s", step, train.steps, loss_avg,
                     rate, format_duration(eta))
        if step % train.checkpoint_every == 0 or step == train.steps:
            save()
    return {"steps": float(step), "elapsed_s": elapsed_before + time.monotonic() - t0,
            "loss": _finite(loss_avg)}


def _finite(value: float) -> float | None:
    """``value``, or ``None`` where it is NaN (no step has been run), for strict JSON."""
    return None if math.isnan(value) else value


def export_weights(out_dir: Path, weights_path: Path) -> None:
    """Write the EMA weights and model configuration of a checkpoint as one safetensors file."""
    state = json.loads((out_dir / STATE).read_text())
    tensors = load_file(str(out_dir / CHECKPOINT))
    ema = {k[4:]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("ema.")}
    metadata = {"model_config": state["model_config"], "step": str(state["step"]),
                "elapsed_s": f"{state['elapsed_s']:.0f}"}
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(lambda p: save_file(ema, str(p), metadata=metadata), weights_path)
