"""The discriminative CNN baseline: architecture, save/load, and the shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.augment import augment
from analysis.baseline import (
    BaselineCNN,
    BaselineConfig,
    load_baseline,
    predict_baseline,
    save_baseline,
)
from analysis.classes import CLASS_NAMES
from analysis.classifier import BASELINE_WEIGHTS, WEIGHTS_DIR
from analysis.classify import images_to_tensor
from analysis.errors import CheckpointError
from analysis.training.pbc import load_images, read_split

PBC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pbc"
needs_pbc = pytest.mark.skipif(not (PBC / "splits.csv").is_file(), reason=f"no PBC data at {PBC}")

torch.set_num_threads(1)


def _rows(split: str, per_class: int) -> list[tuple[str, int]]:
    rows = read_split(PBC, split)
    out: list[tuple[str, int]] = []
    for c in range(len(CLASS_NAMES)):
        out.extend([r for r in rows if r[1] == c][:per_class])
    return out


@needs_pbc
def test_train_steps_save_and_load(tmp_path: Path) -> None:
    data = load_images(PBC, _rows("train", 1), 32)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(data.labels)
    torch.manual_seed(0)
    model = BaselineCNN(BaselineConfig(image_size=32, channels=(8, 16)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        xa = augment(x, g, 32) * 2 - 1
        loss = torch.nn.functional.cross_entropy(model(xa), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    model.eval()
    save_baseline(model, tmp_path / "cnn.safetensors", {"steps": "25"})
    again = load_baseline(tmp_path / "cnn.safetensors")
    assert again.config == model.config
    xi = images_to_tensor(data.images)
    p = predict_baseline(again, xi)
    assert p.shape == (8, 8)
    torch.testing.assert_close(p, predict_baseline(model, xi))
    torch.testing.assert_close(p.sum(dim=1), torch.ones(8))


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_baseline(tmp_path / "nope.safetensors")


@needs_pbc
@pytest.mark.skipif(not (WEIGHTS_DIR / BASELINE_WEIGHTS).is_file(),
                    reason="analysis/weights/baseline_cnn.safetensors not trained yet")
def test_shipped_baseline_classifies_test_cells() -> None:
    model = load_baseline(WEIGHTS_DIR / BASELINE_WEIGHTS)
    data = load_images(PBC, _rows("test", 3), model.config.image_size)
    pred = predict_baseline(model, images_to_tensor(data.images)).argmax(dim=1).numpy()
    assert (pred == data.labels).mean() >= 0.8, list(zip(pred, data.labels))
