"""The adaptive paired diffusion classifier, on a tiny model trained a few steps on real PBC cells."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.classes import CLASS_NAMES
from analysis.classifier import CALIBRATION, DIFFUSION_WEIGHTS, DiffusionClassifier
from analysis.classify import (
    ClassifierConfig,
    anomaly_raw,
    error_deltas,
    images_to_tensor,
    load_diffusion,
    posterior,
    score_cells,
)
from analysis.errors import CheckpointError
from analysis.framing import frame_image
from analysis.heatmap import counterfactual_heatmap, overlay_png
from analysis.model import ModelConfig, build_unet
from analysis.training.evaluate import calibrate
from analysis.training.pbc import load_images, read_split
from tests.analysis.conftest import small_pbc, write_tiny_cnn, write_tiny_diffusion

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
PBC = DATA / "pbc"
AML = DATA / "aml_dev"
CYTONODE = Path(sys.executable).parent / "cytonode"

pytestmark = pytest.mark.skipif(not (PBC / "splits.csv").is_file(),
                                reason=f"PBC data not found at {PBC}")

TINY = ModelConfig(image_size=32, block_out_channels=(16, 32), attention_levels=())
CONFIG = ClassifierConfig(n_timesteps=8, round_size=2, min_samples=4, alpha=0.05, cell_batch=8,
                          unet_batch=64)
T = CONFIG.n_timesteps

torch.set_num_threads(1)  # the test machine is small and shared


def _few_rows(split: str, per_class: int) -> list[tuple[str, int]]:
    rows = read_split(PBC, split)
    out: list[tuple[str, int]] = []
    for c in range(len(CLASS_NAMES)):
        out.extend([r for r in rows if r[1] == c][:per_class])
    return out


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusion model trained 30 steps on 8 PBC train cells, with a calibration on PBC
    val alone (the other labs' val cells, which calibrate() adds when they lie beside PBC, are
    ``test_heldout``'s)."""
    data = load_images(PBC, _few_rows("train", 1), TINY.image_size)
    folder = tmp_path_factory.mktemp("weights")
    write_tiny_diffusion(folder, TINY, data.images, data.labels, steps=30)
    calibrate(folder, small_pbc(tmp_path_factory.mktemp("data") / "pbc", per_class=1), CONFIG,
              per_class=1, seed=0)
    return folder


@pytest.fixture(scope="module")
def test_cells() -> tuple[torch.Tensor, np.ndarray]:
    data = load_images(PBC, _few_rows("test", 1)[::2], TINY.image_size)  # 4 classes
    return images_to_tensor(data.images), data.labels


def test_shapes_and_budget(tiny_weights: Path, test_cells: tuple[torch.Tensor, np.ndarray]) -> None:
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    x, _ = test_cells
    g = torch.Generator("cpu").manual_seed(1)
    ex = score_cells(unet, config, x, CONFIG, g, adaptive=False)
    assert ex.errors.shape == (4, 8, T)
    assert not np.isnan(ex.errors).any()
    assert (ex.unet_evals == 8 * T).all()
    ad = score_cells(unet, config, x, CONFIG, torch.Generator("cpu").manual_seed(1))
    assert ad.errors.shape == (4, 8, T)
    assert (ad.unet_evals <= 8 * T).all()
    # Every evaluated pair is counted once.
    assert (np.sum(~np.isnan(ad.errors), axis=(1, 2)) == ad.unet_evals).all()
    deltas, best = error_deltas(ad.errors)
    p = posterior(deltas, 100.0)
    assert p.shape == (4, 8)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (deltas[np.arange(4), best] == 0).all()


def test_wrong_image_shape_is_refused(tiny_weights: Path) -> None:
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    with pytest.raises(ValueError, match="shape"):
        score_cells(unet, config, torch.zeros(2, 3, 48, 48), CONFIG, torch.Generator())


def test_a_latent_space_model_scores_its_latents() -> None:
    """A model of 4 input channels (latent space, ``bench/latent_vs_pixel.py``) scores latents of
    its shape and refuses RGB images; configurations written before the field are RGB."""
    config = dataclasses.replace(TINY, image_size=16, in_channels=4)
    assert ModelConfig.from_json(config.to_json()) == config
    older = json.loads(TINY.to_json())
    del older["in_channels"]
    assert ModelConfig.from_json(json.dumps(older)).in_channels == 3
    unet = build_unet(config).eval()
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    scores = score_cells(unet, config, z, CONFIG, torch.Generator("cpu").manual_seed(1), adaptive=False)
    assert scores.errors.shape == (3, 8, T) and not np.isnan(scores.errors).any()
    with pytest.raises(ValueError, match=r"\(N, 4, 16, 16\)"):
        score_cells(unet, config, torch.zeros(2, 3, 16, 16), CONFIG, torch.Generator())


def test_deterministic_given_seed(tiny_weights: Path, test_cells: tuple[torch.Tensor, np.ndarray]) -> None:
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    x, _ = test_cells
    runs = [score_cells(unet, config, x, CONFIG, torch.Generator("cpu").manual_seed(seed))
            for seed in (7, 7, 8)]
    assert np.array_equal(runs[0].errors, runs[1].errors, equal_nan=True)
    assert np.array_equal(runs[0].unet_evals, runs[1].unet_evals)
    assert not np.array_equal(runs[0].errors, runs[2].errors, equal_nan=True)


def test_views_pair_every_class_on_the_same_rotated_cell(
        tiny_weights: Path, test_cells: tuple[torch.Tensor, np.ndarray]) -> None:
    """With two views, each paired sample sees the cell either as it is or rotated by 90 degrees,
    the same for every class; the noise and timestep order do not change."""
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    x, _ = test_cells
    x = x[:1]

    def exhaustive(images: torch.Tensor, views: int) -> np.ndarray:
        cfg = dataclasses.replace(CONFIG, views=views)
        return score_cells(unet, config, images, cfg, torch.Generator("cpu").manual_seed(3),
                           adaptive=False).errors[0]  # (classes, T)

    two = exhaustive(x, 2)
    upright, rotated = exhaustive(x, 1), exhaustive(torch.rot90(x, 1, dims=(2, 3)), 1)
    as_is = np.isclose(two, upright, rtol=1e-5, atol=1e-7).all(axis=0)  # per grid timestep
    turned = np.isclose(two, rotated, rtol=1e-5, atol=1e-7).all(axis=0)
    assert (as_is | turned).all()  # every timestep: all classes saw one and the same view
    assert as_is.sum() == T // 2 and turned.sum() == T // 2
    with pytest.raises(ValueError, match="views"):
        ClassifierConfig(views=9)


def test_pruning_drops_a_clearly_wrong_class(tiny_weights: Path,
                                            test_cells: tuple[torch.Tensor, np.ndarray]) -> None:
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    broken = copy.deepcopy(unet)
    wrong = CLASS_NAMES.index("platelet")
    with torch.no_grad():  # this class's embedding now makes the UNet predict garbage
        broken.class_embedding.weight[wrong] = 1000.0 * torch.randn(
            broken.class_embedding.weight.shape[1], generator=torch.Generator().manual_seed(0))
    x, _ = test_cells
    scores = score_cells(broken, config, x, CONFIG, torch.Generator("cpu").manual_seed(0))
    evaluated = np.sum(~np.isnan(scores.errors), axis=2)  # (cells, classes)
    assert (evaluated[:, wrong] < T).all(), evaluated[:, wrong]  # dropped before the budget
    _, best = error_deltas(scores.errors)
    assert (best != wrong).all()
    # Pruning saves evaluations compared with the exhaustive 8 x T.
    assert scores.unet_evals.mean() < 8 * T


def test_adaptive_run_is_a_subset_of_the_exhaustive_run_with_the_same_seed(
        tiny_weights: Path, test_cells: tuple[torch.Tensor, np.ndarray]) -> None:
    """What makes evaluate's adaptive-vs-exhaustive comparison paired: from the same seed both
    modes draw the same noise and timestep orders, so every error the adaptive run computed is
    the exhaustive run's error for that class and timestep."""
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    x, _ = test_cells
    adaptive = score_cells(unet, config, x, CONFIG, torch.Generator("cpu").manual_seed(3))
    exhaustive = score_cells(unet, config, x, CONFIG, torch.Generator("cpu").manual_seed(3),
                             adaptive=False)
    seen = ~np.isnan(adaptive.errors)
    assert not np.isnan(exhaustive.errors).any()
    assert seen.sum() < exhaustive.errors.size  # some classes were dropped early
    np.testing.assert_allclose(adaptive.errors[seen], exhaustive.errors[seen], rtol=1e-4)


def test_heatmap_shape_and_overlay(tiny_weights: Path, test_cells: tuple[torch.Tensor, np.ndarray],
                                   tmp_path: Path) -> None:
    unet, config, _ = load_diffusion(tiny_weights / DIFFUSION_WEIGHTS)
    x, _ = test_cells
    heat = counterfactual_heatmap(unet, config, x[0], 0, 3, CONFIG, torch.Generator().manual_seed(0))
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and np.abs(heat).max() > 0
    again = counterfactual_heatmap(unet, config, x[0], 0, 3, CONFIG, torch.Generator().manual_seed(0))
    assert np.array_equal(heat, again)
    image = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    overlay_png(image, heat, tmp_path / "heat.png", scale=4)
    with Image.open(tmp_path / "heat.png") as im:
        assert im.size == (128, 128) and im.mode == "RGB"
    with pytest.raises(ValueError):
        counterfactual_heatmap(unet, config, x[0], 2, 2, CONFIG, torch.Generator())


def test_framing_any_size() -> None:
    im = Image.new("RGB", (300, 200), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 50, 200))  # left band is cut away by the centre crop
    out = frame_image(im, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] > 250).all()


def test_calibration_file(tiny_weights: Path) -> None:
    cal = json.loads((tiny_weights / CALIBRATION).read_text())
    for key in ("beta", "review_threshold", "abnormal_threshold", "anomaly_score",
                "anomaly_reference", "anomaly_class_mean", "anomaly_class_std",
                "classifier_config", "target_error"):
        assert key in cal
    assert len(cal["anomaly_reference"]) == T
    assert len(cal["anomaly_class_mean"]) == len(CLASS_NAMES)
    model = DiffusionClassifier(tiny_weights)
    assert model.config == CONFIG


def test_calibration_of_another_anomaly_score_is_refused(tiny_weights: Path, tmp_path: Path) -> None:
    """A calibration that normalises another anomaly score (the class gap, tried in commit
    e5e3af2) would z-score this one with the wrong means: loading it must fail and say how to
    mend it."""
    other = tmp_path / "other"
    shutil.copytree(tiny_weights, other)
    cal = json.loads((other / CALIBRATION).read_text())
    cal["anomaly_score"] = "class_gap"
    del cal["anomaly_reference"]
    (other / CALIBRATION).write_text(json.dumps(cal))
    with pytest.raises(CheckpointError, match="evaluate --calibrate"):
        DiffusionClassifier(other)
    proc = _run("classify", str(next(PBC.glob("*/*.jpg"))), "--json", "--weights", str(other))
    assert proc.returncode != 0 and "--calibrate" in proc.stderr and proc.stdout == ""


def test_anomaly_score_is_the_best_class_error_above_the_val_reference() -> None:
    """Cells explained worse than the val reference score above zero, better below; only the
    best class counts, and only on the timesteps where it was evaluated."""
    reference = np.array([0.4, 0.2, 0.1, 0.05])
    errors = np.full((2, 3, 4), 9.0)  # the other classes: far worse, and ignored
    errors[0, 1] = reference * 2.0
    errors[1, 2] = reference / 2.0
    errors[1, :, 3] = np.nan  # a timestep this cell never reached
    raw = anomaly_raw(errors, np.array([1, 2]), reference)
    assert raw == pytest.approx([np.log(2.0), -np.log(2.0)])


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CYTONODE), *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_classify_cli_json_contract(tiny_weights: Path, tmp_path: Path) -> None:
    rows = _few_rows("test", 1)[:2]
    files = [str(PBC / rel) for rel, _ in rows]
    folder = tmp_path / "cells"
    folder.mkdir()
    with Image.open(PBC / rows[0][0]) as im:  # other sizes and formats are framed the same way
        im.resize((256, 200)).save(folder / "wide.bmp")
        im.save(folder / "cell.png")
    (folder / "notes.txt").write_text("not an image")
    proc = _run("classify", *files, str(folder), "--json", "--weights", str(tiny_weights),
                "--batch", "2", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 4
    assert [r["path"] for r in lines[:2]] == files
    for r in lines:
        assert set(r) == {"path", "label", "probabilities", "uncertainty", "anomaly_score",
                          "review", "abnormal", "review_reasons", "pixel_spacing_um",
                          "pixel_spacing_source", "scale_ok"}
        assert bool(r["review_reasons"]) == (r["review"] or r["abnormal"])
        assert r["pixel_spacing_source"] == "red cells" and 0.1 < r["pixel_spacing_um"] < 0.6
        assert r["label"] in CLASS_NAMES
        assert list(r["probabilities"]) == list(CLASS_NAMES)
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-4
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert 0.0 <= r["uncertainty"] <= 1.0
        assert isinstance(r["anomaly_score"], float)
        assert isinstance(r["review"], bool) and isinstance(r["abnormal"], bool)
    assert "classified 4/4" in proc.stderr  # progress for lists longer than a batch
    again = _run("classify", *files, str(folder), "--json", "--weights", str(tiny_weights),
                 "--batch", "2", "--threads", "1")
    assert again.stdout == proc.stdout


def test_classify_cli_pixel_spacing(tiny_weights: Path, tmp_path: Path) -> None:
    """Without metadata the scale comes from the red cells (a PBC image: 36.9 um across its 160 px,
    0.23 um/px); ``--pixel-spacing`` overrides it and is checked against them: the right spacing
    passes, one 40 % off is reported; the framing follows the spacing given."""
    path = str(PBC / _few_rows("test", 1)[0][0])
    args = ("--json", "--weights", str(tiny_weights), "--threads", "1")
    measured = json.loads(_run("classify", path, *args).stdout)
    assert measured["pixel_spacing_source"] == "red cells" and measured["scale_ok"] is None
    assert measured["pixel_spacing_um"] == pytest.approx(36.9 / 160, rel=0.15)
    right = json.loads(_run("classify", path, *args, "--pixel-spacing", "0.23").stdout)
    assert right["pixel_spacing_source"] == "given" and right["scale_ok"] is True
    wrong = json.loads(_run("classify", path, *args, "--pixel-spacing", "0.33").stdout)
    assert wrong["pixel_spacing_um"] == 0.33 and wrong["scale_ok"] is False
    assert wrong["probabilities"] != right["probabilities"]
    bad = _run("classify", path, *args, "--pixel-spacing", "0")
    assert bad.returncode == 2 and "--pixel-spacing" in bad.stderr and bad.stdout == ""
    blank = tmp_path / "blank.png"
    Image.new("RGB", (160, 160), (230, 220, 225)).save(blank)
    proc = _run("classify", str(blank), *args)
    assert proc.returncode == 2 and "--pixel-spacing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_classify_cli_bad_input(tiny_weights: Path, tmp_path: Path) -> None:
    proc = _run("classify", str(tmp_path / "missing.png"), "--json", "--weights", str(tiny_weights))
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    proc = _run("classify", str(broken), "--json", "--weights", str(tiny_weights))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_evaluate_cli_reports_both_models(tiny_weights: Path, tmp_path: Path) -> None:
    """``cytonode evaluate --json``, the command behind the model card's table, end to end on real
    PBC test cells and aml_dev images (a tiny diffusion model and a tiny CNN)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tiny_weights / DIFFUSION_WEIGHTS, folder / DIFFUSION_WEIGHTS)
    data = load_images(PBC, _few_rows("train", 1), TINY.image_size)
    write_tiny_cnn(folder, CLASS_NAMES, data.images, data.labels, steps=10)
    pbc = small_pbc(tmp_path / "pbc", per_class=3)  # the CNN reads every val and test cell
    calibrate(folder, pbc, CONFIG, per_class=1, seed=0)
    arrays = tmp_path / "eval.npz"
    proc = _run("evaluate", "--json", "--weights", str(folder), "--data", str(pbc),
                "--aml", str(AML), "--per-class", "1", "--exhaustive-per-class", "1",
                "--aml-limit", "3", "--threads", "1", "--arrays-out", str(arrays))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    n_test = len(read_split(pbc, "test"))
    assert n_test == 3 * len(CLASS_NAMES)
    assert result["data"]["pbc_test_cells_diffusion"] == len(CLASS_NAMES)
    assert result["data"]["pbc_test_cells_cnn"] == n_test
    assert result["data"]["aml_blasts"] == result["data"]["aml_neutrophils"] == 3
    for name in ("diffusion", "cnn"):
        part = result[name]
        test = part["pbc_test"]
        assert set(test["per_class_recall"]) == set(CLASS_NAMES)
        for key in ("balanced_accuracy", "ece", "aurc"):
            assert 0.0 <= test[key] <= 1.0
        assert 0.0 <= part["anomaly_auroc_aml_blasts_vs_pbc_test"] <= 1.0
        assert 0.0 <= part["domain_shift_aml_neutrophil_accuracy"] <= 1.0
        assert set(part["aml_blasts_labelled_as"]) == set(CLASS_NAMES)
        assert sum(part["aml_blasts_labelled_as"].values()) == 3
        assert 0.0 <= part["aml_blasts_flagged_for_review"] <= 1.0
    assert 0.0 <= result["diffusion"]["uncertainty_auroc_aml_blasts_vs_pbc_test"] <= 1.0
    # Exhaustive: every class on every grid timestep; the adaptive run can only spend less.
    exhaustive = result["diffusion"]["exhaustive"]
    assert exhaustive["cells"] == len(CLASS_NAMES)
    assert exhaustive["unet_evals_per_cell"] == len(CLASS_NAMES) * T
    assert exhaustive["adaptive_unet_evals_per_cell_same_cells"] <= len(CLASS_NAMES) * T
    assert (exhaustive["cells_right_only_exhaustive"] - exhaustive["cells_right_only_adaptive"]
            == round((exhaustive["accuracy"] - exhaustive["adaptive_accuracy_same_cells"])
                     * len(CLASS_NAMES)))
    assert result["diffusion"]["throughput"]["cells_per_s"] > 0
    saved = np.load(arrays)
    assert saved["d_prob"].shape == (len(CLASS_NAMES), len(CLASS_NAMES))
    assert saved["c_prob"].shape == (n_test, len(CLASS_NAMES))
    assert saved["d_anom_blast"].shape == saved["c_anom_blast"].shape == (3,)
    # The same-lab control is what the saved scores of the aml_dev cells say.
    for name, prefix in (("diffusion", "d"), ("cnn", "c")):
        blast, neut = saved[f"{prefix}_anom_blast"], saved[f"{prefix}_anom_neut"]
        assert result[name]["anomaly_auroc_aml_blasts_vs_aml_neutrophils"] == pytest.approx(
            np.mean((blast[:, None] > neut[None]) + 0.5 * (blast[:, None] == neut[None])))
        assert 0.0 <= result[name]["anomaly_auroc_aml_neutrophils_vs_pbc_test"] <= 1.0


SHIPPED = ROOT / "analysis" / "weights"
# The shipped model is still training (see analysis/MODEL_CARD.md; step 12750: PBC val balanced
# accuracy 0.92): two test cells of every class, and a floor well above chance (1/8).
SHIPPED_EASY = CLASS_NAMES
SHIPPED_MIN_ACCURACY = 0.75


@pytest.mark.skipif(not (SHIPPED / DIFFUSION_WEIGHTS).is_file() or not (SHIPPED / CALIBRATION).is_file(),
                    reason="analysis/weights/cytodiffusion.safetensors or calibration.json not there yet")
def test_shipped_weights_classify_pbc_test_cells() -> None:
    model = DiffusionClassifier(SHIPPED)
    rows = [r for r in _few_rows("test", 2) if CLASS_NAMES[r[1]] in SHIPPED_EASY]
    data = load_images(PBC, rows, model.image_size)
    pred = model.predict(data.images, torch.Generator("cpu").manual_seed(0))
    assert pred.probabilities.shape == (len(rows), len(CLASS_NAMES))
    assert (pred.label == data.labels).mean() >= SHIPPED_MIN_ACCURACY, list(zip(pred.label, data.labels))
