"""A site's own reference network: `cytonode calibrate-site --labelled` (analysis.site_adapt)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analysis.classes import CLASS_NAMES
from analysis.classifier import WEIGHTS_DIR, read_calibration
from analysis.framing import FIELD_OF_VIEW_UM
from analysis.review import ReviewModel
from analysis.site_adapt import SOURCE_PACK, VERIFIED_MINIMUM, SourcePack, balanced_weights
from analysis.training.site_readable import other_stain

from .conftest import DATA

N = {name: i for i, name in enumerate(CLASS_NAMES)}
CLI = [sys.executable, "-m", "dicom_node.app.cli", "calibrate-site"]
needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / SOURCE_PACK).is_file()
                                   or not (DATA / "chula_wbc").is_dir(),
                                   reason="shipped source pack or Chula cells not present")


def test_balanced_weights_give_every_predicted_class_the_same_weight() -> None:
    """A smear is mostly neutrophils: re-sampled under these weights, each class the network
    predicts counts the same, and a class predicted for a stray cell or two counts nothing."""
    calls = np.array([N["neutrophil"]] * 60 + [N["lymphocyte"]] * 25 + [N["monocyte"]] * 14
                     + [N["basophil"]])
    p = np.full((len(calls), len(CLASS_NAMES)), 1e-4)
    p[np.arange(len(calls)), calls] = 0.99
    p /= p.sum(axis=1, keepdims=True)
    w = balanced_weights(p)
    assert w.sum() == pytest.approx(1.0)
    share = {c: float(w[calls == N[c]].sum()) for c in ("neutrophil", "lymphocyte", "monocyte")}
    assert max(share.values()) - min(share.values()) < 0.02, share
    assert w[calls == N["basophil"]].sum() < 0.02  # one cell does not stand for a class
    with pytest.raises(ValueError, match="non-negative"):
        balanced_weights(-p)


def _write(images: np.ndarray, folder: Path, prefix: str) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}_{i:03d}.png"
        Image.fromarray(image).save(path)
        out.append(path)
    return out


def _named_and_unnamed(size: int) -> tuple[Any, Any]:
    """6 of Chula's train cells of each class, named by the lab, and 6 more of each, unnamed."""
    from analysis.training.labs import load_lab

    train = load_lab(DATA, "chula", "train", size, FIELD_OF_VIEW_UM)
    named = train.per_class(6, seed=0)
    rest = train.take(np.array([i for i, p in enumerate(train.paths) if p not in set(named.paths)]))
    return named, rest.per_class(6, seed=1)


def _stained(cells: Any) -> Any:
    """``cells`` in a stain no training lab used (:func:`other_stain`)."""
    from analysis.training.labs import LabCells

    return LabCells(cells.lab, cells.split, other_stain(cells.images), cells.labels, cells.paths)


def _calibrate(tmp_path: Path, named: object, unnamed: object, site_id: str, size: int,
               *options: str) -> dict:
    """`calibrate-site --labelled` (and ``options``) on ``named`` cells (folders by class) and
    ``unnamed`` ones."""
    labelled = tmp_path / site_id / "labelled"
    for c in np.unique(named.labels):  # type: ignore[attr-defined]
        _write(named.images[named.labels == c], labelled / CLASS_NAMES[c], "cell")  # type: ignore[attr-defined]
    _write(unnamed.images, tmp_path / site_id / "cells", "cell")  # type: ignore[attr-defined]
    run = subprocess.run([*CLI, str(tmp_path / site_id / "cells"), "--labelled", str(labelled),
                          "--id", site_id, "--pixel-spacing", str(FIELD_OF_VIEW_UM / size),
                          "--data-dir", str(tmp_path / "var"), "--json", *options],
                         check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@needs_weights
@pytest.mark.timeout(600)  # two calibrations, each reading 60 cells with both models
def test_labelled_cells_refit_a_network_for_a_new_stain_and_not_for_a_known_one(tmp_path: Path) -> None:
    """A lab names 6 of its cells of each normal class and gives 30 more unnamed.

    Chula's cells as they are (a lab the shipped network trained on): the shipped network
    already calls the named cells right, so `calibrate-site --labelled` keeps it, and does not
    fine-tune (the default where the rule allows): the shipped models may read the named cells
    at the validated level (the fine-tune rule), so nothing is trained; read right, 6 cells a
    class still cannot show 85 %, and the summary says so. The same cells in another
    stain (:func:`other_stain`; the shipped network has never seen it), with --no-finetune: the site's own
    network, cross-validated on the named cells, beats the shipped one, is stored beside the calibration, named in its label and
    used for that site's cells, where it calls the lab's other cells better. A damaged network file is refused."""
    from analysis.site import load_site, network_path
    from analysis.training.labs import LabCells, load_lab

    model = ReviewModel.load(WEIGHTS_DIR, read_calibration(WEIGHTS_DIR))
    assert model is not None
    size = model.image_size
    named, unnamed = _named_and_unnamed(size)

    known = _calibrate(tmp_path, named, unnamed, "known", size)
    assert known["site_network"]["used"] is False and known["site_network"]["shipped_accuracy"] >= 0.9
    assert known["site_network"]["finetuned"] is False, known["site_network"]
    assert known["site_network"]["finetune_rule"].endswith(": not fine-tuned"), known["site_network"]
    # the class the node reports (both models) is right on the named cells, but 6 a class cannot
    # show 85 %: the interval of even a perfect read reaches below it, and the summary says so
    verified = known["verified"]
    assert verified["balanced_accuracy"] >= VERIFIED_MINIMUM > verified["interval_95"][0], verified
    assert verified["cells"] == len(named)
    assert verified["below_validated_accuracy"].endswith("(too few cells to show it)"), verified
    assert "network_sha256" not in known and not network_path(tmp_path / "var", "known").exists()
    assert "labelled" not in load_site(tmp_path / "var", "known").label

    summary = _calibrate(tmp_path, _stained(named), _stained(unnamed), "new-stain", size,
                         "--no-finetune")
    gate = summary["site_network"]
    assert gate["used"] is True and gate["site_accuracy"] >= gate["shipped_accuracy"] + 0.02, gate
    assert summary["labelled"] == {CLASS_NAMES[c]: 6 for c in np.unique(named.labels)}
    site = load_site(tmp_path / "var", "new-stain")
    assert site.network is not None and site.network_sha256 == summary["network_sha256"]
    assert site.label.endswith(f"{len(named) + len(unnamed)} cells, {len(named)} labelled)")
    assert model.usable_site(site) == (site, ())
    verified = summary["verified"]
    assert site.verified_balanced_accuracy == verified["balanced_accuracy"]
    assert (verified["below_validated_accuracy"] is not None) == (
        verified["interval_95"][0] < VERIFIED_MINIMUM), verified

    def accuracy(cells: LabCells, s: object) -> float:
        return float(np.mean(model.measure(cells.images, s)[0] == cells.labels))

    val = _stained(load_lab(DATA, "chula", "val", size, FIELD_OF_VIEW_UM))
    assert accuracy(val, site) >= accuracy(val, None) + 0.05, (accuracy(val, site), accuracy(val, None))

    listing = subprocess.run([*CLI, "--list", "--data-dir", str(tmp_path / "var")],
                             check=False, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "new-stain (" in listing.stdout and "labelled)" in listing.stdout

    raw = bytearray(network_path(tmp_path / "var", "new-stain").read_bytes())
    raw[-1] ^= 0xFF
    network_path(tmp_path / "var", "new-stain").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not the one it was fitted with"):
        load_site(tmp_path / "var", "new-stain")
    # the newest calibration is damaged: jobs do not quietly fall back to the older one
    listing = subprocess.run([*CLI, "--list", "--data-dir", str(tmp_path / "var")],
                             check=False, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "new-stain\tDAMAGED: site calibration new-stain: its network" in listing.stdout
    assert "known (" in listing.stdout
    from dicom_node.errors import SettingsError
    from dicom_node.settings import Settings

    with pytest.raises(SettingsError, match="the newest site calibration, new-stain, cannot be used"):
        Settings(data_dir=tmp_path / "var").active_site()
    assert Settings(data_dir=tmp_path / "var", site_calibration="known").active_site().site_id == "known"


def test_a_site_read_below_the_validated_accuracy_is_outside_the_validated_domain() -> None:
    """A site whose named cells the node reads below the accuracy it is validated for, or
    above it but with an interval reaching below: every slide of it is outside the validated
    domain, with the figure, its interval and what to do in words; with the whole interval at
    or above it (or only a figure there, as stored before), or without named cells, nothing
    changes. It survives the JSON."""
    from analysis.domain import check_domain
    from analysis.site import SiteCalibration

    def site(verified: float | None, interval: tuple[float, ...] = ()) -> SiteCalibration:
        return SiteCalibration(
            site_id="lab-5", created="2026-12-05T10:00:00+00:00", cells=60, source="lab-5",
            feature_shift=(0.0,) * 4, feature_threshold=9.0, flag_rate_before=0.3,
            flag_rate_after=0.15, verified_balanced_accuracy=verified,
            verified_cells=0 if verified is None else 50, verified_interval=interval)

    below = SiteCalibration.from_json(site(0.62, (0.48, 0.75)).to_json())
    assert below.verified_balanced_accuracy == 0.62 and below.verified_cells == 50
    domain = check_domain(True, 7.4, None, None, below)
    assert not domain.inside
    assert domain.summary == ("outside the validated domain: site lab-5's 50 labelled cells are "
                              "read right at 62.0% (balanced; 95% interval 48.0%-75.0%), below the "
                              f"{VERIFIED_MINIMUM:.0%} the node is validated for")
    assert "read right at 62.0% (balanced), below" in check_domain(True, 7.4, None, None, site(0.62)).summary
    for fine in (site(VERIFIED_MINIMUM), site(0.97, (0.9, 0.99)), site(0.9, (VERIFIED_MINIMUM, 0.95)),
                 site(None)):
        assert check_domain(True, 7.4, None, None, fine).inside
    # read well, but on too few cells to show it: the interval reaches below (criteria.txt, 08:51)
    straddles = check_domain(True, 7.4, None, None, site(0.96, (0.844, 0.974)))
    assert not straddles.inside
    assert straddles.summary == ("outside the validated domain: site lab-5's 50 labelled cells are "
                                 "read right at 96.0% (balanced; 95% interval 84.4%-97.4%), an interval "
                                 f"reaching below the {VERIFIED_MINIMUM:.0%} the node is validated for "
                                 "(too few cells to show it)")
    good = json.loads(below.to_json())
    for bad in ({"verified_balanced_accuracy": 1.2}, {"verified_interval": [0.7, 0.5]},
                {"verified_balanced_accuracy": None}):
        with pytest.raises(ValueError, match="verified_"):
            SiteCalibration.from_json(json.dumps({**good, **bad}))


def test_a_site_with_far_more_unsure_cells_than_the_validated_labs_is_outside() -> None:
    """The unsure count of a site's unlabelled cells against the validated labs' share: far
    more (one-sided binomial, p < 0.01) puts every slide outside the validated domain, with
    the count in words; as many as the labs had, too few cells, or none measured (a file
    written before) change nothing. The count survives the JSON; nonsense is refused."""
    from analysis.domain import check_domain
    from analysis.site import SiteCalibration, binomial_tail

    assert binomial_tail(2, 2, 0.5) == pytest.approx(0.25)
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(11, 10, 0.3) == 0.0
    assert binomial_tail(3, 4, 0.5) == pytest.approx(5 / 16)

    def site(unsure: int, measured: int, expected: float | None = 0.294) -> SiteCalibration:
        return SiteCalibration(
            site_id="lab-6", created="2026-12-05T10:00:00+00:00", cells=200, source="lab-6",
            feature_shift=(0.0,) * 4, feature_threshold=9.0, flag_rate_before=0.3,
            flag_rate_after=0.15, unsure_cells=unsure, unsure_measured=measured,
            unsure_expected=expected)

    unread = SiteCalibration.from_json(site(120, 200).to_json())
    domain = check_domain(True, 7.4, None, None, unread)
    assert not domain.inside
    assert domain.summary.startswith(
        "outside the validated domain: site lab-6's cells are read unsure: 120 of 200 cells "
        "(60.0%) uncertain or the models disagree, against at most 29.4% at the validated labs "
        "(binomial p ")
    # 37 % of 151 (p 0.026, Chula's test cells as a site) is not far enough beyond 29.4 %
    for fine in (site(56, 151), site(40, 200), site(20, 29), site(0, 0, None), site(150, 200, None)):
        assert fine.too_many_unsure is None and check_domain(True, 7.4, None, None, fine).inside
    good = json.loads(unread.to_json())
    for bad, message in (({"unsure_cells": 201}, "unsure_cells"), ({"unsure_expected": 1.5}, "unsure_expected")):
        with pytest.raises(ValueError, match=message):
            SiteCalibration.from_json(json.dumps({**good, **bad}))
    old = {k: v for k, v in good.items() if not k.startswith("unsure_")}
    assert SiteCalibration.from_json(json.dumps(old)).too_many_unsure is None


@needs_weights
def test_a_site_the_node_cannot_read_is_found_without_a_single_named_cell(tmp_path: Path) -> None:
    """Chula's cells in a stain no training lab used, calibrated as unlabelled cells of normal
    smears: the site's shift absorbs the stain, so "unlike any training class" flags only the
    rule's share of them, yet both models are unsure of most of them. The calibration finds it,
    the command warns, `--list` repeats it and every slide of the site is outside the validated
    domain. The same cells as they are are read: no warning."""
    from analysis.domain import check_domain
    from analysis.site import load_site
    from analysis.training.labs import load_lab

    size = ReviewModel.load(WEIGHTS_DIR, read_calibration(WEIGHTS_DIR)).image_size  # type: ignore[union-attr]
    cells = load_lab(DATA, "chula", "train", size, FIELD_OF_VIEW_UM).per_class(8, seed=3)
    runs = {}
    for name, images in (("as-is", cells.images), ("blue-stain", other_stain(cells.images))):
        _write(images, tmp_path / name, "cell")
        run = subprocess.run([*CLI, str(tmp_path / name), "--id", name, "--pixel-spacing",
                              str(FIELD_OF_VIEW_UM / size), "--data-dir", str(tmp_path / "var")],
                             check=False, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        runs[name] = run.stdout
    share = read_calibration(WEIGHTS_DIR)["review_rule"]["site_unsure_share"]
    assert f"uncertain or the models disagree (the validated labs: at most {share:.1%})" in runs["as-is"]
    assert "WARNING" not in runs["as-is"]
    plain, stained = load_site(tmp_path / "var", "as-is"), load_site(tmp_path / "var", "blue-stain")
    assert plain.unsure_measured == stained.unsure_measured == len(cells)
    assert plain.too_many_unsure is None and check_domain(True, 7.4, None, None, plain).inside
    assert stained.flag_rate_after <= 0.2  # the distance alone would not see it
    assert stained.too_many_unsure is not None
    assert (f"WARNING: {stained.too_many_unsure}: every slide of this site is outside the "
            "validated domain") in runs["blue-stain"]
    assert check_domain(True, 7.4, None, None, stained).reasons == (stained.too_many_unsure,)
    listing = subprocess.run([*CLI, "--list", "--data-dir", str(tmp_path / "var")],
                             check=False, capture_output=True, text=True, timeout=120)
    assert f"  warning: {stained.too_many_unsure}: its slides are outside the validated domain" in listing.stdout
    assert "\tunlabelled cells unsure: " in listing.stdout


def test_a_damaged_calibration_newer_than_the_one_in_use_stops_the_quiet_fallback(tmp_path: Path) -> None:
    """Jobs use the newest site calibration. A damaged file written before it changes nothing;
    one written after it is refused with its reason, rather than the node quietly using an
    older calibration (perhaps another lab's)."""
    import os

    from analysis.site import SiteCalibration, newest_site, save_site, site_path

    good = SiteCalibration(site_id="lab-6", created="2026-12-05T10:00:00+00:00", cells=60,
                           source="lab-6", feature_shift=(0.0,) * 4, feature_threshold=9.0,
                           flag_rate_before=0.3, flag_rate_after=0.15)
    save_site(tmp_path, good)
    bad = site_path(tmp_path, "lab-7")
    bad.write_text("{not json")
    then = site_path(tmp_path, "lab-6").stat().st_mtime
    os.utime(bad, (then - 60, then - 60))
    assert newest_site(tmp_path).site_id == "lab-6"  # type: ignore[union-attr]
    os.utime(bad, (then + 60, then + 60))
    with pytest.raises(ValueError, match="the newest site calibration, lab-7, cannot be used"):
        newest_site(tmp_path)
    bad.write_text(site_path(tmp_path, "lab-6").read_text())  # lab-6's calibration under lab-7's name
    os.utime(bad, (then + 60, then + 60))
    with pytest.raises(ValueError, match="lab-7.json holds site calibration 'lab-6'"):
        newest_site(tmp_path)


def test_a_fine_tuned_sites_threshold_flags_the_share_the_shipped_models_flagged() -> None:
    """`matched_threshold`: a sharper classifier (lower uncertainty on the same cells) gets a lower
    threshold, under which it flags the share of the cells the shipped models flagged under the
    rule's; it never rises above the rule's, and cells none of which the shipped models flag
    keep the rule's. Uncertainties of different cells are refused."""
    from analysis.site_adapt import matched_threshold

    rng = np.random.default_rng(5)
    shipped = rng.beta(2.0, 3.0, 400)
    sharper = shipped * rng.uniform(0.3, 0.7, 400)
    t = matched_threshold(shipped, sharper, 0.4)
    assert t < 0.4
    assert abs(np.mean(sharper > t) - np.mean(shipped > 0.4)) <= 1 / 400
    assert matched_threshold(shipped, np.minimum(1.0, shipped * 2.0), 0.4) == 0.4  # less sure: the rule's
    assert matched_threshold(shipped * 0.1, sharper, 0.4) == 0.4  # the shipped flag none
    with pytest.raises(ValueError, match="same cells"):
        matched_threshold(shipped, sharper[:10], 0.4)


def test_the_verification_interval_narrows_with_more_named_cells() -> None:
    """The interval holds the figure (a perfect read's too), a class read without error still
    has spread, and four times the named cells give a markedly narrower interval."""
    from analysis.site_adapt import balanced_accuracy_interval

    def interval(per_class: int) -> tuple[float, float]:
        labels = np.repeat(np.arange(5), per_class)
        correct = np.ones(len(labels), bool)
        correct[labels == 1] = np.arange(per_class) < per_class * 0.6  # one class at 60 %
        return balanced_accuracy_interval(correct, labels)

    low5, high5 = interval(5)
    low20, high20 = interval(20)
    # a perfect read: the interval holds the figure (100 %), and its low end keeps the spread
    perfect = np.repeat(np.arange(5), 10)
    low, high = balanced_accuracy_interval(np.ones(len(perfect), bool), perfect)
    assert high == 1.0 and 0.85 < low < 0.95, (low, high)
    assert low5 < 0.92 < high5 and low20 < 0.92 < high20  # the figure, (4 x 1.0 + 0.6) / 5
    assert high5 < 1.0 and (high20 - low20) < 0.6 * (high5 - low5), (low5, high5, low20, high20)


def test_calibrate_site_refuses_bad_labelled_folders(tmp_path: Path) -> None:
    """Cells must sit in folders named by a class, five or more of each, two classes or more;
    otherwise a clear error, exit 2 and nothing written."""
    image = np.full((40, 40, 3), 200, np.uint8)
    cases = {
        "blasts": ({"blast": 6, "neutrophil": 6}, "'blast' is not a folder named by a class"),
        "few": ({"neutrophil": 6, "monocyte": 3}, "monocyte has 3 cells; a class needs at least 5"),
        "one": ({"neutrophil": 6}, "at least two classes"),
    }
    for name, (counts, message) in cases.items():
        for c, n in counts.items():
            _write(np.stack([image] * n), tmp_path / name / c, c)
        run = subprocess.run([*CLI, "--labelled", str(tmp_path / name), "--id", "ok",
                              "--data-dir", str(tmp_path / "var")], check=False,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (name, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "var").exists()


@needs_weights
def test_the_shipped_pack_holds_every_class_of_every_training_lab() -> None:
    pack = SourcePack.load(WEIGHTS_DIR / SOURCE_PACK)
    assert pack.images.shape[1:] == (96, 96, 3)
    for lab in ("pbc", "bccd", "chula"):
        assert lab in pack.labs
    pbc = np.array(pack.labs) == "pbc"
    assert sorted(set(pack.labels[pbc].tolist())) == list(range(len(CLASS_NAMES)))


@pytest.mark.skipif(not (DATA / "chula_wbc").is_dir(), reason="Chula cells not present")
def test_site_pack_builds_the_pack_a_labelled_calibration_refits_beside(tmp_path: Path) -> None:
    """`python -m analysis.training.site_pack` (how the shipped pack is made): the asked number of
    each class's train cells of each lab, framed as the reference frames them, read back as
    stored (JPEG); a lab it does not know is refused."""
    from analysis.training.labs import load_lab

    out = tmp_path / "pack.safetensors"
    run = subprocess.run([sys.executable, "-m", "analysis.training.site_pack", "--labs", "chula",
                          "--per-class", "3", "--data", str(DATA), "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"15 cells (chula) -> {out}")
    pack = SourcePack.load(out)
    assert set(pack.labs) == {"chula"} and np.bincount(pack.labels).tolist() == [3, 3, 3, 3, 3]
    framed = load_lab(DATA, "chula", "train", 96, FIELD_OF_VIEW_UM).per_class(3, 0)
    assert pack.labels.tolist() == framed.labels.tolist()
    assert np.abs(pack.images.astype(int) - framed.images.astype(int)).mean() < 4  # JPEG, quality 90
    bad = subprocess.run([sys.executable, "-m", "analysis.training.site_pack", "--labs", "mars",
                          "--out", str(tmp_path / "x.safetensors")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--labs are pbc, bccd, chula" in bad.stderr


@needs_weights
@pytest.mark.timeout(300)
def test_fine_tuning_the_whole_network_fits_the_named_cells_and_keeps_the_sites_statistics() -> None:
    """`finetune_network` (FT: measured leave-one-lab-out, not what calibrate-site does): on
    Chula's cells in a stain no lab used, every weight moves, the batch-norm statistics adapted
    to the site stay as they were, the named cells are fitted better than before (lower
    cross-entropy under their names), and the same seed gives the same network."""
    import copy

    import torch

    from analysis.reference import load_reference, reference_logits
    from analysis.site_adapt import batchnorm_state, finetune_network
    from analysis.training.labs import load_lab

    model, config, _ = load_reference(WEIGHTS_DIR / "reference_effnet.safetensors")
    pack = SourcePack.load(WEIGHTS_DIR / SOURCE_PACK)
    named = load_lab(DATA, "chula", "train", config.image_size, FIELD_OF_VIEW_UM).per_class(6, seed=0)
    cells = other_stain(named.images)

    def loss(network: torch.nn.Module) -> float:
        logits = torch.from_numpy(reference_logits(network, cells)[0])
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(named.labels)))

    tuned = finetune_network(copy.deepcopy(model), cells, named.labels, pack, steps=20, seed=4)
    again = finetune_network(copy.deepcopy(model), cells, named.labels, pack, steps=20, seed=4)
    assert not tuned.training
    assert all(torch.equal(v, batchnorm_state(model)[k]) for k, v in batchnorm_state(tuned).items())
    assert not torch.equal(tuned._conv_stem.weight, model._conv_stem.weight)
    assert not torch.equal(tuned._fc.weight, model._fc.weight)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert loss(tuned) < 0.8 * loss(model), (loss(tuned), loss(model))
    with pytest.raises(ValueError, match="at least one step"):
        finetune_network(copy.deepcopy(model), cells, named.labels, pack, steps=0)


@needs_weights
@pytest.mark.timeout(300)
def test_the_diffusion_classifier_fine_tuned_on_named_cells_denoises_them_better() -> None:
    """`finetune_diffusion` (measured leave-one-lab-out, not the default): a copy of the shipped
    UNet trained on a new stain's named cells beside the pack denoises those cells, under
    their own class, with less error than before; the shipped UNet is untouched, the copy is
    in eval mode and the same seed gives the same weights."""
    import torch

    from analysis.classifier import DiffusionClassifier
    from analysis.model import build_scheduler
    from analysis.site_adapt import finetune_diffusion, resample
    from analysis.training.labs import load_lab

    classifier = DiffusionClassifier(WEIGHTS_DIR)
    unet, config = classifier.unet, classifier.model_config
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    load = config.image_size * 4 // 3
    named = load_lab(DATA, "chula", "train", load, FIELD_OF_VIEW_UM).per_class(6, seed=0)
    cells = other_stain(named.images)
    pack = SourcePack.load(WEIGHTS_DIR / SOURCE_PACK)
    packed = resample(pack.images, load)
    assert packed.shape[1:] == (load, load, 3)

    def error(net: torch.nn.Module) -> float:
        g = torch.Generator("cpu").manual_seed(5)
        x = torch.from_numpy(resample(cells, config.image_size)).permute(0, 3, 1, 2).float() / 127.5 - 1
        alphas = build_scheduler(config).alphas_cumprod
        total = 0.0
        with torch.no_grad():
            for t in (150, 250, 350, 450):
                noise = torch.randn(x.shape, generator=g)
                a = alphas[t]
                pred = net(a.sqrt() * x + (1 - a).sqrt() * noise, torch.full((len(x),), t),
                           class_labels=torch.from_numpy(named.labels)).sample
                total += float(((pred - noise) ** 2).mean())
        return total

    tuned = finetune_diffusion(unet, config, cells, named.labels, packed, pack.labels, steps=40, seed=3)
    again = finetune_diffusion(unet, config, cells, named.labels, packed, pack.labels, steps=40, seed=3)
    assert not tuned.training
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert error(tuned) < 0.97 * error(unet), (error(tuned), error(unet))


@needs_weights
def test_a_fine_tuned_sites_named_cells_are_each_read_by_a_copy_trained_without_them() -> None:
    """`out_of_fold_diffusion` (a fine-tuned site's verification out of fold, measured by
    `few_shot --verify-folds`; not what calibrate-site does): the named cells of each fold
    are read by a copy of the diffusion classifier fine-tuned on the other folds' cells alone,
    not by the copy trained on all of them (which has seen the cell it reads); too few cells
    to fill the folds are refused."""
    import copy
    import dataclasses

    import torch

    from analysis.classifier import DiffusionClassifier
    from analysis.site_adapt import (
        VERIFY_FOLDS,
        finetune_diffusion,
        folds,
        out_of_fold_diffusion,
        resample,
    )
    from analysis.training.labs import load_lab

    classifier = DiffusionClassifier(WEIGHTS_DIR)
    classifier.config = dataclasses.replace(classifier.config, n_timesteps=8)  # a smaller budget, for time
    size = classifier.image_size
    load = size * 4 // 3
    named = load_lab(DATA, "chula", "train", load, FIELD_OF_VIEW_UM).per_class(2, seed=0)
    cells = other_stain(named.images)
    read = resample(cells, size)
    pack = SourcePack.load(WEIGHTS_DIR / SOURCE_PACK)
    packed = resample(pack.images, load)
    p = out_of_fold_diffusion(classifier, cells, read, named.labels, packed, pack.labels, steps=12, seed=1)
    assert p.shape == (len(named), len(CLASS_NAMES)) and np.allclose(p.sum(axis=1), 1.0)

    def read_by(trained: np.ndarray, scored: np.ndarray) -> np.ndarray:
        other = copy.copy(classifier)
        other.unet = finetune_diffusion(classifier.unet, classifier.model_config, cells[trained],
                                        named.labels[trained], packed, pack.labels, steps=12, seed=1)
        return other.predict(read[scored], torch.Generator("cpu").manual_seed(1)).probabilities

    fold = folds(named.labels, VERIFY_FOLDS, 1)
    everyone = np.ones(len(named), bool)
    for k in range(VERIFY_FOLDS):
        held = fold == k
        assert 0 < held.sum() < len(named)
        assert np.allclose(p[held], read_by(~held, held)), k
    assert not np.allclose(p[held], read_by(everyone, held))  # the copy that saw them reads them otherwise
    with pytest.raises(ValueError, match="cannot fill 2 folds"):
        out_of_fold_diffusion(classifier, cells[:1], read[:1], named.labels[:1], packed, pack.labels, steps=1)


@needs_weights
@pytest.mark.timeout(900)
def test_a_site_fine_tuned_on_its_named_cells_reads_its_slides_with_its_own_models(tmp_path: Path) -> None:
    """`calibrate-site --labelled` fine-tuning (fewer steps than the default, for time): a lab
    in a stain no training lab used gets its reference network fine-tuned whole and its own
    diffusion classifier, both in the one network file its calibration names; its label and
    summary say so; a slide analysed with that calibration is classified by the site's
    diffusion classifier (the report names it, and the result differs from the same site
    without it); the site has its own uncertainty threshold, below the rule's, and the report
    carries it. --finetune without --labelled, with --no-finetune, or bad steps, are refused."""
    import torch

    from analysis.classifier import DiffusionClassifier
    from analysis.pipeline import PipelineConfig, classify_slide
    from analysis.site import load_site, network_path
    from analysis.site_adapt import DIFFUSION_PREFIX

    from .conftest import SAMPLE_SLIDE

    model = ReviewModel.load(WEIGHTS_DIR, read_calibration(WEIGHTS_DIR))
    assert model is not None
    size = model.image_size
    named, unnamed = _named_and_unnamed(size)

    labelled = tmp_path / "tuned" / "labelled"
    for c in np.unique(named.labels):
        _write(other_stain(named.images[named.labels == c]), labelled / CLASS_NAMES[c], "cell")
    _write(_stained(unnamed).images, tmp_path / "tuned" / "cells", "cell")
    common = [str(tmp_path / "tuned" / "cells"), "--id", "tuned", "--pixel-spacing",
              str(FIELD_OF_VIEW_UM / size), "--data-dir", str(tmp_path / "var")]
    for bad, message in (([], "--finetune needs --labelled cells"),
                         (["--labelled", str(labelled), "--no-finetune"], "contradict"),
                         (["--labelled", str(labelled), "--finetune-steps", "20"], "two whole numbers")):
        run = subprocess.run([*CLI, *common, "--finetune", *bad], check=False, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    run = subprocess.run([*CLI, *common, "--labelled", str(labelled), "--finetune",
                          "--finetune-steps", "15,20", "--json"],
                         check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["site_network"]["used"] and summary["site_network"]["finetuned"], summary
    assert summary["site_network"]["finetune_rule"].endswith("below 85%: fine-tuned"), summary
    site = load_site(tmp_path / "var", "tuned")
    assert site.finetuned and site.label.endswith(
        f"{len(named) + len(unnamed)} cells, {len(named)} labelled, fine-tuned)"), site.label
    # its own uncertainty threshold, never above the rule's, stored and reported
    rule_threshold = model.rule.uncertainty_threshold
    assert site.uncertainty_threshold is not None and site.uncertainty_threshold <= rule_threshold
    assert summary["uncertainty_threshold"] == {"site": site.uncertainty_threshold, "rule": rule_threshold}
    # the named cells alone (no unlabelled ones to set its threshold on): not fine-tuned, and why
    alone = subprocess.run([*CLI, "--labelled", str(labelled), "--id", "named-only", *common[3:], "--json"],
                           check=False, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    gate = json.loads(alone.stdout)["site_network"]
    assert not gate["finetuned"] and not gate["diffusion_finetuned"], gate
    assert "but only 0 unlabelled cells were given" in gate["finetune_rule"], gate
    assert gate["finetune_rule"].endswith(": not fine-tuned") and "uncertainty_threshold" not in json.loads(alone.stdout)
    listing = subprocess.run([*CLI, "--list", "--data-dir", str(tmp_path / "var")], check=False,
                             capture_output=True, text=True, timeout=300)
    assert f"'uncertain' above {site.uncertainty_threshold:.3f} (the site's own" in listing.stdout, listing.stdout
    from safetensors import safe_open

    with safe_open(str(network_path(tmp_path / "var", "tuned")), "pt") as fh:
        keys = set(fh.keys())
    assert {k for k in keys if not k.startswith(DIFFUSION_PREFIX)} == set(model.reference.model.state_dict())
    shipped = DiffusionClassifier(WEIGHTS_DIR)
    own = shipped.for_network(site.network)
    assert own is not shipped and shipped.for_network(None) is shipped
    assert not torch.equal(own.unet.conv_in.weight, shipped.unet.conv_in.weight)

    config = PipelineConfig(n_timesteps=8, cell_batch=8, heatmaps=False, site=site)
    tuned = classify_slide(sorted(SAMPLE_SLIDE.glob("*.dcm")), config)
    parameters = tuned.provenance.parameters
    assert parameters["site_diffusion_classifier"].startswith("shipped diffusion classifier fine-tuned on")
    assert "fine-tuned whole" in parameters["site_reference_network"]
    assert parameters["review_uncertainty_threshold"] == site.uncertainty_threshold
    without = {k: v for k, v in site.network.items() if not k.startswith(DIFFUSION_PREFIX)}
    import dataclasses

    plain = classify_slide(sorted(SAMPLE_SLIDE.glob("*.dcm")), dataclasses.replace(
        config, site=dataclasses.replace(site, network=without, finetuned=False,
                                         uncertainty_threshold=None)))
    assert "site_diffusion_classifier" not in plain.provenance.parameters
    assert plain.provenance.parameters["review_uncertainty_threshold"] == rule_threshold
    assert [c.probabilities for c in tuned.cells] != [c.probabilities for c in plain.cells]

    # where the site's network does not beat the shipped one, the file holds the diffusion
    # classifier alone: the shipped network reads the site's cells, its own diffusion classifier
    # classifies them, and the report says both
    from analysis.site import network_digest, save_site

    alone = {k: v for k, v in site.network.items() if k.startswith(DIFFUSION_PREFIX)}
    save_site(tmp_path / "var", dataclasses.replace(site, site_id="tuned-diffusion", network=alone,
                                                     network_sha256=network_digest(alone)))
    diffusion_only = load_site(tmp_path / "var", "tuned-diffusion")
    assert model.network_for(diffusion_only) is model.reference.model
    read = classify_slide(sorted(SAMPLE_SLIDE.glob("*.dcm")),
                          dataclasses.replace(config, site=diffusion_only)).provenance.parameters
    assert read["site_reference_network"].startswith("shipped reference (the site's own did not"), read
    assert read["site_diffusion_classifier"].startswith("shipped diffusion classifier fine-tuned on")
