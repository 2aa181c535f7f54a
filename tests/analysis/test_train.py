"""Training of the diffusion model: checkpoints, resuming, export, leaving a class out.

Runs the real training loop on a small PBC folder (two real train images per class).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from analysis.classes import CLASS_NAMES
from analysis.errors import CheckpointError
from analysis.model import ModelConfig
from analysis.training.train import (
    STATE,
    TrainConfig,
    export_weights,
    format_duration,
    train_diffusion,
)

PBC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pbc"
pytestmark = pytest.mark.skipif(not (PBC / "splits.csv").is_file(), reason=f"no PBC data at {PBC}")

TINY = ModelConfig(image_size=16, block_out_channels=(16, 32), attention_levels=())

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mini_pbc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PBC-shaped folder with two real train images of each class."""
    root = tmp_path_factory.mktemp("pbc")
    with (PBC / "splits.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    picked = [r for c in CLASS_NAMES for r in [r for r in rows if r["label"] == c][:2]]
    with (root / "splits.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(picked[0]))
        writer.writeheader()
        writer.writerows(picked)
    for r in picked:
        (root / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PBC / r["path"], root / r["path"])
    return root


def test_checkpoints_resume_and_export(mini_pbc: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train_diffusion(TrainConfig(mini_pbc, out, steps=4, batch_size=4, checkpoint_every=2,
                                        warmup_steps=2), TINY)
    assert first["steps"] == 4
    state = json.loads((out / STATE).read_text())
    assert state["step"] == 4 and ModelConfig.from_json(state["model_config"]) == TINY
    # The same command with a larger total continues from step 4, not from 0.
    second = train_diffusion(TrainConfig(mini_pbc, out, steps=6, batch_size=4, checkpoint_every=2,
                                         warmup_steps=2, t_max=500), TINY)
    assert second["steps"] == 6
    state = json.loads((out / STATE).read_text())
    assert state["step"] == 6 and state["train_config"]["t_max"] == "500"
    assert second["elapsed_s"] >= first["elapsed_s"]
    # Run again at its last step: nothing to train, and the loss it stopped with, not NaN.
    again = train_diffusion(TrainConfig(mini_pbc, out, steps=6, batch_size=4, checkpoint_every=2,
                                        warmup_steps=2, t_max=500), TINY)
    assert again["steps"] == 6 and again["loss"] == pytest.approx(state["loss"])
    assert isinstance(state["loss"], float) and state["loss"] > 0
    export_weights(out, tmp_path / "w" / "cytodiffusion.safetensors")
    with safe_open(str(tmp_path / "w" / "cytodiffusion.safetensors"), "pt") as fh:
        meta = fh.metadata()
        assert meta["step"] == "6"
        assert ModelConfig.from_json(meta["model_config"]) == TINY
        assert all(fh.get_tensor(k).dtype == torch.float32 for k in fh.keys())  # noqa: SIM118 (safe_open is not a dict)
    # A checkpoint of another architecture is not silently overwritten.
    other = ModelConfig(image_size=16, block_out_channels=(16, 16), attention_levels=())
    with pytest.raises(CheckpointError, match="another model configuration"):
        train_diffusion(TrainConfig(mini_pbc, out, steps=8, batch_size=4), other)


def test_training_without_a_class(mini_pbc: Path, tmp_path: Path) -> None:
    known = tuple(c for c in CLASS_NAMES if c != "erythroblast")
    config = ModelConfig(image_size=16, block_out_channels=(16, 32), attention_levels=(),
                         class_names=known)
    # (with the strong augmentation, which the run records)
    train_diffusion(TrainConfig(mini_pbc, tmp_path / "loco", steps=2, batch_size=4,
                                strong_augment=True, max_shift_um=2.0), config)
    state = json.loads((tmp_path / "loco" / "train_state.json").read_text())
    assert state["train_config"]["strong_augment"] == "True"
    assert state["train_config"]["max_shift_um"] == "2.0"
    export_weights(tmp_path / "loco", tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as fh:
        assert ModelConfig.from_json(fh.metadata()["model_config"]).class_names == known
        assert fh.get_tensor("class_embedding.weight").shape[0] == len(known)


def test_bad_train_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="t_max"):
        TrainConfig(tmp_path, tmp_path, t_max=0)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(tmp_path, tmp_path, steps=0)
    with pytest.raises(ValueError, match="max_shift_um"):
        TrainConfig(tmp_path, tmp_path, max_shift_um=10.0)  # the cell would leave the frame
    # cytonode train trains on pixels; a latent-space configuration is refused before any work.
    latent = ModelConfig(image_size=16, block_out_channels=(16, 32), attention_levels=(), in_channels=4)
    with pytest.raises(ValueError, match="pixel-space"):
        train_diffusion(TrainConfig(tmp_path, tmp_path / "run", steps=2), latent)
    assert not (tmp_path / "run").exists()


def test_the_shift_augmentation_moves_the_cell_off_the_centre() -> None:
    """A dot at the centre stays within a pixel at the default shift and moves up to the
    asked fraction of half the frame with a larger one (what `--max-shift-um` sets)."""
    from analysis.augment import augment

    x = torch.zeros(64, 3, 64, 64)
    x[:, :, 30:34, 30:34] = 1.0
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")

    def offsets(shift: float) -> torch.Tensor:
        out = augment(x.clone(), torch.Generator().manual_seed(0), 48, stain=False, shift=shift)
        w = out.mean(dim=1)
        w = w / w.sum(dim=(1, 2), keepdim=True)
        cx, cy = (w * xx).sum(dim=(1, 2)) - 23.5, (w * yy).sum(dim=(1, 2)) - 23.5
        return torch.maximum(cx.abs(), cy.abs())

    assert offsets(0.03).max() < 1.5  # 3 % of 24 px, plus the free rotation's rounding
    far = offsets(0.25)  # up to 6 px
    assert far.max() > 4.0 and far.max() < 7.0


def test_format_duration() -> None:
    assert format_duration(59.6) == "00:01:00"
    assert format_duration(3 * 3600 + 4 * 60 + 5) == "03:04:05"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03:04:05"
