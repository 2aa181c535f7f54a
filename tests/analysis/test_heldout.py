"""Leave-one-class-out: models trained without one class, calibrated and evaluated on it.

A tiny diffusion model and a tiny CNN are trained a few steps on real PBC cells of
seven classes (erythroblast left out); the numbers are meaningless, the plumbing is not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.classes import CLASS_NAMES, kept_classes
from analysis.classifier import CALIBRATION, BaselineClassifier, DiffusionClassifier
from analysis.classify import ClassifierConfig
from analysis.errors import CheckpointError
from analysis.model import ModelConfig
from analysis.training.evaluate import calibrate, evaluate, evaluate_heldout
from analysis.training.pbc import load_images, read_split
from tests.analysis.conftest import write_tiny_cnn, write_tiny_diffusion

ROOT = Path(__file__).resolve().parents[2]
PBC = ROOT.parent / "shared" / "data" / "pbc"
AML = ROOT.parent / "shared" / "data" / "aml_dev"
CYTONODE = Path(sys.executable).parent / "cytonode"

pytestmark = pytest.mark.skipif(not (PBC / "splits.csv").is_file(),
                                reason=f"PBC data not found at {PBC}")

HELDOUT = "erythroblast"
KNOWN = tuple(c for c in CLASS_NAMES if c != HELDOUT)
TINY = ModelConfig(image_size=32, block_out_channels=(16, 32), attention_levels=(),
                   class_names=KNOWN)
CONFIG = ClassifierConfig(n_timesteps=8, round_size=2, min_samples=4, alpha=0.05, cell_batch=8,
                          unet_batch=64)

torch.set_num_threads(1)


def _one_per_class(split: str) -> list[tuple[str, int]]:
    rows = read_split(PBC, split, KNOWN)
    return [next(r for r in rows if r[1] == c) for c in range(len(KNOWN))]


@pytest.fixture(scope="module")
def loco_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Diffusion model and CNN trained a few steps on one cell of each known class, calibrated."""
    data = load_images(PBC, _one_per_class("train"), TINY.image_size)
    folder = tmp_path_factory.mktemp("loco")
    write_tiny_diffusion(folder, TINY, data.images, data.labels, steps=20)
    write_tiny_cnn(folder, KNOWN, data.images, data.labels, steps=10)
    calibrate(folder, PBC, CONFIG, per_class=1, seed=0)
    return folder


def test_kept_classes() -> None:
    assert kept_classes(["erythroblast"]) == KNOWN
    assert kept_classes([]) == CLASS_NAMES
    with pytest.raises(ValueError, match="unknown classes"):
        kept_classes(["blast"])
    with pytest.raises(ValueError, match="at least two"):
        kept_classes(list(CLASS_NAMES[1:]))


def test_split_without_a_class() -> None:
    full = read_split(PBC, "train")
    kept = read_split(PBC, "train", KNOWN)
    n_heldout = sum(1 for _, c in full if CLASS_NAMES[c] == HELDOUT)
    assert n_heldout > 0
    assert len(kept) == len(full) - n_heldout
    assert {c for _, c in kept} == set(range(len(KNOWN)))
    # A label is the index in the model's own class list.
    by_path = dict(full)
    assert all(KNOWN[c] == CLASS_NAMES[by_path[p]] for p, c in kept)
    with pytest.raises(ValueError, match="unknown classes"):
        read_split(PBC, "train", ("neutrophil", "blast"))


def test_calibration_covers_the_known_classes_only(loco_weights: Path) -> None:
    cal = json.loads((loco_weights / CALIBRATION).read_text())
    assert len(cal["anomaly_class_mean"]) == len(KNOWN)
    # one PBC val cell of each known class, none held out, plus the val cells of the labs that
    # lie beside PBC (they have no erythroblasts to leave out)
    assert cal["val_cells_pbc"] == len(KNOWN)
    assert cal["val_labs"] == ["pbc", "bccd", "chula_wbc"]  # their folders
    assert cal["val_cells"] > cal["val_cells_pbc"]
    assert "cnn" in cal


def test_heldout_evaluation_reports_both_models(loco_weights: Path) -> None:
    result = evaluate_heldout(loco_weights, PBC, HELDOUT, None, per_class=2, heldout_limit=3, seed=0)
    assert result["heldout_class"] == HELDOUT and result["classes"] == list(KNOWN)
    data = result["data"]
    assert data["known_test_cells_diffusion"] == 2 * len(KNOWN)
    assert data["heldout_test_cells_diffusion"] == 3
    n_test = sum(1 for _, c in read_split(PBC, "test") if CLASS_NAMES[c] == HELDOUT)
    assert data["heldout_test_cells_cnn"] == n_test
    for model, n in (("diffusion", 3), ("cnn", n_test)):
        part = result[model]
        assert 0.0 <= part["anomaly_auroc_heldout_vs_known"] <= 1.0
        assert sum(part["heldout_labelled_as"].values()) == n
        assert set(part["heldout_labelled_as"]) == set(KNOWN)
        assert set(part["known_test"]["per_class_recall"]) == set(KNOWN)
    assert 0.0 <= result["diffusion"]["uncertainty_auroc_heldout_vs_known"] <= 1.0


def test_subset_weights_are_refused_where_all_classes_are_needed(loco_weights: Path) -> None:
    with pytest.raises(CheckpointError, match="trained without erythroblast"):
        DiffusionClassifier(loco_weights)
    with pytest.raises(CheckpointError, match="trained without erythroblast"):
        BaselineClassifier(loco_weights)
    with pytest.raises(CheckpointError, match="--heldout-class"):
        evaluate(loco_weights, PBC, AML, None, per_class=1, exhaustive_per_class=0, aml_limit=1,
                 seed=0)
    with pytest.raises(CheckpointError, match="not held out"):
        evaluate_heldout(loco_weights, PBC, "neutrophil", None, per_class=1, heldout_limit=1, seed=0)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CYTONODE), *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_evaluate_cli_heldout(loco_weights: Path) -> None:
    proc = _run("evaluate", "--json", "--weights", str(loco_weights), "--data", str(PBC),
                "--heldout-class", HELDOUT, "--per-class", "1", "--heldout-limit", "2",
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["data"]["heldout_test_cells_diffusion"] == 2
    proc = _run("evaluate", "--json", "--weights", str(loco_weights), "--data", str(PBC),
                "--heldout-class", "neutrophil", "--per-class", "1", "--threads", "1")
    assert proc.returncode == 1
    assert "not held out" in proc.stderr


def test_train_cli_needs_two_classes(tmp_path: Path) -> None:
    excluded = [arg for c in CLASS_NAMES[1:] for arg in ("--exclude-class", c)]
    proc = _run("train", "--data", str(PBC), "--out", str(tmp_path / "run"), *excluded)
    assert proc.returncode == 2
    assert "at least two classes" in proc.stderr
    assert not (tmp_path / "run").exists()
