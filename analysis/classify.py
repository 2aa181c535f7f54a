"""The adaptive paired diffusion classifier (CytoDiffusion, small).

A cell is classified by asking which class condition lets the UNet best predict
the noise that was added to it. For every cell we draw, once, a random order of
a fixed grid of timesteps and one noise image per timestep; every class is
scored on exactly the same noisy images (paired samples). The procedure runs in
rounds: each round evaluates the next few timesteps for every class still in the
race, then a one-sided paired t-test drops each class whose error is
significantly larger than the current best class's. A cell is finished when a
single class is left or every timestep of the grid (the budget) has been used.
The exhaustive mode scores all classes on the whole grid, for comparison.

Cells and classes are batched together: one UNet call holds (cell, class,
timestep) triples of many cells.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file
from scipy import stats

from analysis.errors import CheckpointError
from analysis.model import ModelConfig, build_scheduler, build_unet, cell_weight


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """How the diffusion classifier spends its UNet evaluations.

    Parameters
    ----------
    n_timesteps:
        Size of the fixed timestep grid: the budget of paired samples per class.
        The exhaustive mode uses all of them for every class. 64 (with 8 views), chosen on PBC val
        (384 cells, step-12750 weights, grid [125, 500)): balanced accuracy 0.917 against 0.898 with
        32 timesteps and 8 views and 0.896 with 32 timesteps and 1 view, for 12 % more time (141 s
        against 126 s on 2 threads): the paired test stops most cells early anyway, and the hard
        ones get more samples before they run out of budget.
    t_min, t_max:
        The grid holds the centres of ``n_timesteps`` equal bins of ``[t_min, t_max)``.
        ``[125, 500)``, chosen on PBC val: above t = 500 the squaredcos schedule leaves
        too little of the cell for the class to matter (per-timestep accuracy at chance, step-250
        weights); below t = 125 the error carries little class information: on 128 val cells
        scored exhaustively (step-8000 weights) the timesteps below 125 alone gave balanced
        accuracy 0.555 against 0.83-0.87 for each other quarter of [0, 500), and leaving them out
        raised the exhaustive accuracy from 0.859 to 0.891; the adaptive procedure on 384 val cells
        (step 9750): 0.888 on [125, 500) against 0.875 on [0, 500).
    round_size:
        Timesteps evaluated per round (for every class still active) in adaptive mode.
    min_samples:
        No class is dropped before this many paired samples.
    alpha:
        One-sided significance level of the paired t-test that drops a class.
    cell_batch:
        Cells classified together.
    unet_batch:
        Largest batch of one UNet call.
    device:
        ``cpu`` or ``cuda``.
    error_scale:
        ``log``: classes are compared on the logarithm of their errors, i.e. on the ratio to the best
        class at each timestep, which puts every timestep on the same scale (the raw error falls about
        tenfold from t = 0 to t = 500, so the smallest timesteps dominate a linear comparison and its
        variance). ``linear``: on the raw errors. Chosen on PBC val (96 cells, every class on all 32
        timesteps, step-1000 weights): balanced accuracy 0.49 (log) against 0.42 (linear), and the
        paired test drops classes sooner (59 against 73 UNet evaluations per cell at alpha 0.1).
    views:
        Test-time views of the cell from the dihedral group (90 degree rotations, then a mirror):
        the ``k``-th paired sample of a cell (in its random order of the grid) sees view
        ``k mod views``, the same for every class, so the pairing is kept and the first samples
        already cover the views. ``1``: the cell as it is. Training drew the same views.
        8 chosen on PBC val with ``n_timesteps`` (above).
    """

    n_timesteps: int = 64
    t_min: int = 125
    t_max: int = 500
    round_size: int = 2
    min_samples: int = 4
    alpha: float = 0.1
    cell_batch: int = 32
    unet_batch: int = 128
    device: str = "cpu"
    error_scale: str = "log"
    views: int = 8

    @classmethod
    def from_calibration(cls, raw: dict[str, object], **overrides: object) -> ClassifierConfig:
        """The configuration stored in a calibration file (``error_scale`` absent: ``linear``,
        ``views`` absent: 1, what files written before they existed were measured with)."""
        values = dict(raw)
        values.setdefault("error_scale", "linear")
        values.setdefault("views", 1)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.n_timesteps < 2:
            raise ValueError("n_timesteps must be at least 2")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError("t_min and t_max must satisfy 0 <= t_min < t_max")
        if self.t_max - self.t_min < self.n_timesteps:
            raise ValueError("the range [t_min, t_max) must hold n_timesteps distinct timesteps")
        if not 1 <= self.round_size <= self.n_timesteps:
            raise ValueError("round_size must lie in [1, n_timesteps]")
        if self.min_samples < 2:
            raise ValueError("min_samples must be at least 2 (a t-test needs a variance)")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError("alpha must lie in (0, 0.5)")
        if self.cell_batch < 1 or self.unet_batch < 1:
            raise ValueError("cell_batch and unet_batch must be positive")
        if self.error_scale not in ("log", "linear"):
            raise ValueError("error_scale must be 'log' or 'linear'")
        if not 1 <= self.views <= 8:
            raise ValueError("views must lie in [1, 8] (the dihedral group of the square)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError("device must be 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DiffusionScores:
    """Raw denoising errors of a batch of cells.

    Attributes
    ----------
    errors:
        ``(N, C, T)`` mean squared noise-prediction error of cell ``n`` under class
        ``c`` at grid timestep ``j``; NaN where that pair was never evaluated.
    timesteps:
        ``(T,)`` the timestep grid.
    unet_evals:
        ``(N,)`` UNet evaluations spent on each cell.
    error_scale:
        The scale on which classes were compared (see :class:`ClassifierConfig`).
    """

    errors: np.ndarray
    timesteps: np.ndarray
    unet_evals: np.ndarray
    error_scale: str = "linear"


def timestep_grid(config: ClassifierConfig) -> torch.Tensor:
    """The fixed grid: centres of ``n_timesteps`` equal bins of ``[t_min, t_max)``."""
    width = (config.t_max - config.t_min) / config.n_timesteps
    centres = config.t_min + (torch.arange(config.n_timesteps, dtype=torch.float64) + 0.5) * width
    return centres.floor().long()


def dihedral_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """``(B, views, C, S, S)``: view ``v`` of each image is ``rot90`` by ``v mod 4``, mirrored if ``v >= 4``."""
    turned = [torch.rot90(x, v % 4, dims=(2, 3)) for v in range(views)]
    return torch.stack([torch.flip(o, dims=(3,)) if v >= 4 else o for v, o in enumerate(turned)], dim=1)


def load_diffusion(path: Path, device: str = "cpu") -> tuple[UNet2DModel, ModelConfig, dict[str, str]]:
    """Load exported EMA weights (see :func:`analysis.training.train.export_weights`).

    Returns
    -------
    tuple
        The UNet in eval mode, its :class:`ModelConfig` and the file's metadata.

    Raises
    ------
    CheckpointError
        If the file is missing, has no ``model_config`` or does not fit the model.
    """
    if not path.is_file():
        raise CheckpointError(f"diffusion weights {path} not found")
    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata() or {})
    if "model_config" not in metadata:
        raise CheckpointError(f"{path} has no model_config metadata")
    config = ModelConfig.from_json(metadata["model_config"])
    unet = build_unet(config)
    try:
        unet.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit its model_config: {exc}") from exc
    unet.eval().requires_grad_(False)
    # channels-last convolutions: 72 against 57 UNet evaluations/s on one core of this CPU (batch 128)
    return unet.to(device, memory_format=torch.channels_last), config, metadata


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8`` ``(N, H, W, 3)`` to ``float32`` ``(N, 3, H, W)`` in ``[-1, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def _t_critical(config: ClassifierConfig) -> np.ndarray:
    """One-sided t critical values indexed by the number of paired samples."""
    crit = np.full(config.n_timesteps + 1, np.inf)
    for n in range(config.min_samples, config.n_timesteps + 1):
        crit[n] = float(stats.t.ppf(1.0 - config.alpha, n - 1))
    return crit


@torch.no_grad()
def score_cells(
    unet: UNet2DModel,
    model_config: ModelConfig,
    images: torch.Tensor,
    config: ClassifierConfig,
    generator: torch.Generator,
    *,
    adaptive: bool = True,
) -> DiffusionScores:
    """Denoising errors of cells under every class condition.

    Parameters
    ----------
    unet, model_config:
        The class-conditional diffusion model (see :func:`load_diffusion`).
    images:
        ``(N, 3, S, S)`` in ``[-1, 1]``, ``S = model_config.image_size`` (in latent space the
        scaled latents, ``(N, model_config.in_channels, S, S)``).
    config:
        Budget and test settings.
    generator:
        CPU generator; noise and timestep orders are drawn from it, cell after
        cell, so the result depends only on its seed and the cells' order.
    adaptive:
        ``True``: paired sequential test that drops classes; ``False``: every
        class on every grid timestep (exhaustive).

    Returns
    -------
    DiffusionScores
    """
    size, channels = model_config.image_size, model_config.in_channels
    if images.ndim != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(f"images must have shape (N, {channels}, {size}, {size}), not {tuple(images.shape)}")
    n_cells = images.shape[0]
    n_classes = len(model_config.class_names)
    n_t = config.n_timesteps
    grid = timestep_grid(config)
    alphas = build_scheduler(model_config).alphas_cumprod.to(torch.float32)
    t_crit = _t_critical(config)
    device = torch.device(config.device)
    errors = np.full((n_cells, n_classes, n_t), np.nan, dtype=np.float64)
    log_scale = config.error_scale == "log"
    unet_evals = np.zeros(n_cells, dtype=np.int64)
    weight = cell_weight(model_config)
    weight = weight / (weight.sum() * channels)

    for start in range(0, n_cells, config.cell_batch):
        stop = min(n_cells, start + config.cell_batch)
        b = stop - start
        x0 = dihedral_views(images[start:stop].float(), config.views)  # (b, views, C, S, S)
        # Drawn once per cell and shared by every class: the order in which the
        # grid is visited and one noise image per grid timestep.
        orders = torch.empty(b, n_t, dtype=torch.long)
        noises = torch.empty(b, n_t, channels, size, size)
        for i in range(b):
            orders[i] = torch.randperm(n_t, generator=generator)
            noises[i] = torch.randn(n_t, channels, size, size, generator=generator)
        active = np.ones((b, n_classes), dtype=bool)
        n_done = np.zeros(b, dtype=np.int64)
        finished = np.zeros(b, dtype=bool)
        step = config.round_size if adaptive else n_t

        while not finished.all():
            # 1. The (cell, class, position in the cell's order) triples of this round.
            job_cell: list[int] = []
            job_class: list[int] = []
            job_pos: list[int] = []
            for i in range(b):
                if finished[i]:
                    continue
                last = min(n_t, int(n_done[i]) + step)
                for c in np.flatnonzero(active[i]):
                    for k in range(int(n_done[i]), last):
                        job_cell.append(i)
                        job_class.append(int(c))
                        job_pos.append(k)
            cell = torch.tensor(job_cell, dtype=torch.long)
            cls = torch.tensor(job_class, dtype=torch.long)
            pos = torch.tensor(job_pos, dtype=torch.long)
            grid_index = orders[cell, pos]
            t = grid[grid_index]
            eps = noises[cell, pos]
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * x0[cell, pos % config.views] + (1.0 - a).sqrt() * eps

            # 2. The UNet on all of them, in chunks.
            err = torch.empty(len(job_cell))
            for s in range(0, len(job_cell), config.unet_batch):
                e = slice(s, s + config.unet_batch)
                pred = unet(noisy[e].to(device), t[e].to(device), class_labels=cls[e].to(device)).sample
                err[e] = (((pred.float().cpu() - eps[e]) ** 2) * weight).sum(dim=(1, 2, 3))
            errors[start + cell.numpy(), cls.numpy(), grid_index.numpy()] = err.double().numpy()
            np.add.at(unet_evals, start + cell.numpy(), 1)

            # 3. Paired test: drop classes significantly worse than the best.
            for i in range(b):
                if finished[i]:
                    continue
                n_done[i] = min(n_t, int(n_done[i]) + step)
                n = int(n_done[i])
                seen = orders[i, :n].numpy()
                if adaptive and n >= config.min_samples:
                    act = np.flatnonzero(active[i])
                    e_act = errors[start + i][act][:, seen]  # (A, n)
                    if log_scale:
                        e_act = np.log(e_act)
                    best = int(np.argmin(e_act.mean(axis=1)))
                    t_stat = paired_t(e_act - e_act[best])
                    drop = (t_stat > t_crit[n]) & (np.arange(len(act)) != best)
                    active[i, act[drop]] = False
                if active[i].sum() == 1 or n >= n_t:
                    finished[i] = True
    return DiffusionScores(errors=errors, timesteps=grid.numpy(), unet_evals=unet_evals,
                           error_scale=config.error_scale)


def paired_t(diff: np.ndarray) -> np.ndarray:
    """t statistic of the mean of paired differences along the last axis (``n >= 2`` of them)."""
    n = diff.shape[-1]
    return np.asarray(diff.mean(axis=-1) / (diff.std(axis=-1, ddof=1) / math.sqrt(n) + 1e-12))


def error_deltas(errors: np.ndarray, error_scale: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Paired mean error of each class above the best class, per cell.

    The best class of a cell is the one with the smallest mean error among the
    classes evaluated on the most timesteps (the survivors); it was evaluated
    wherever any class was. For every class the difference to the best is
    averaged over the timesteps where that class was evaluated.

    Parameters
    ----------
    errors:
        ``(N, C, T)`` with NaN where not evaluated (see :class:`DiffusionScores`).
    error_scale:
        ``log`` compares the logarithms of the errors (mean log ratio to the best class).

    Returns
    -------
    tuple
        ``deltas`` ``(N, C)`` (0 for the best class, >= 0 mostly) and ``best`` ``(N,)``.
    """
    if error_scale not in ("log", "linear"):
        raise ValueError("error_scale must be 'log' or 'linear'")
    if error_scale == "log":
        errors = np.log(errors)
    n_cells, n_classes, _ = errors.shape
    counts = np.sum(~np.isnan(errors), axis=2)
    deltas = np.zeros((n_cells, n_classes))
    best = np.zeros(n_cells, dtype=np.int64)
    for i in range(n_cells):
        survivors = np.flatnonzero(counts[i] == counts[i].max())
        means = np.nanmean(errors[i, survivors], axis=1)
        b = int(survivors[np.argmin(means)])
        best[i] = b
        for c in range(n_classes):
            mask = ~np.isnan(errors[i, c])
            deltas[i, c] = float(np.mean(errors[i, c, mask] - errors[i, b, mask]))
    return deltas, best


def posterior(deltas: np.ndarray, beta: float) -> np.ndarray:
    """Posterior over classes: ``softmax(-beta * delta)`` (``beta`` fitted on val)."""
    logits = -beta * deltas
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def anomaly_raw(errors: np.ndarray, best: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """How badly the best class explains each cell, before per-class normalisation.

    The mean over evaluated timesteps of ``log(error_best(t) / reference(t))``,
    where ``reference(t)`` is the median best-class error of val cells at grid
    timestep ``t``; dividing by it removes the strong dependence of the error on
    the timestep, so cells scored on different timesteps are comparable.

    A complexity-corrected alternative was tried and not kept: the "class gap" (minus the
    largest paired log-error gap of any class to the best one). Chosen on val with the
    leave-one-class-out model it separated held-out erythroblasts far better (test AUROC 0.723
    against 0.245) but aml_dev myeloblasts far worse (0.283 against 0.677), see the model card.
    """
    out = np.zeros(errors.shape[0])
    for i in range(errors.shape[0]):
        e = errors[i, best[i]]
        mask = ~np.isnan(e)
        out[i] = float(np.mean(np.log(e[mask] / reference[mask])))
    return out


def diffusion_metadata_summary(metadata: dict[str, str]) -> dict[str, object]:
    """The provenance fields of a weights file worth reporting."""
    return {"model_config": json.loads(metadata["model_config"]),
            "train_step": int(metadata.get("step", "0")),
            "train_elapsed_s": float(metadata.get("elapsed_s", "nan"))}
