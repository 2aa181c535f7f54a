"""The review rule: which cells go to a person and why (analysis.review)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.classes import CLASS_NAMES
from analysis.classifier import CALIBRATION, WEIGHTS_DIR, read_calibration
from analysis.results import FLAG_REASON_LABELS, CellResult, FlagReasonValues
from analysis.review import DENSITY_WEIGHTS, ReviewModel, ReviewRule, combine, decide
from analysis.uncertainty import auroc

from .conftest import DATA

AML = DATA / "aml_dev"
N = {name: i for i, name in enumerate(CLASS_NAMES)}


def _rule(**kw: object) -> ReviewRule:
    values: dict[str, object] = {"uncertainty_threshold": 0.3, "feature_threshold": 10.0}
    values.update(kw)
    return ReviewRule(**values)  # type: ignore[arg-type]


def test_every_reason_that_applies_is_named_in_a_fixed_order() -> None:
    label = np.array([N["neutrophil"], N["ig"], N["lymphocyte"], N["monocyte"], N["neutrophil"]])
    reference = np.array([N["neutrophil"], N["ig"], N["monocyte"], N["monocyte"], N["erythroblast"]])
    uncertainty = np.array([0.1, 0.1, 0.5, 0.1, 0.1])
    distance = np.array([3.0, 3.0, 3.0, 12.0, 3.0])
    d = decide(_rule(), label, reference, uncertainty, distance)
    assert d.review.tolist() == [False, True, True, True, True]
    assert d.reasons[0] == ()
    assert d.reasons[1] == (FlagReasonValues.SIGNIFICANT_CLASS,)
    assert d.reasons[2] == (FlagReasonValues.HIGH_UNCERTAINTY, FlagReasonValues.MODELS_DISAGREE)
    assert d.reasons[3] == (FlagReasonValues.HIGH_ANOMALY_SCORE,)
    # the reference alone calling an erythroblast is enough, and the models disagree
    assert d.reasons[4] == (FlagReasonValues.SIGNIFICANT_CLASS, FlagReasonValues.MODELS_DISAGREE)
    # every suspected abnormal cell is also flagged for review
    assert d.abnormal.tolist() == [False, False, False, True, False]
    assert not np.any(d.abnormal & ~d.review)


def test_outside_the_validated_domain_flags_every_cell() -> None:
    label = np.array([N["neutrophil"], N["lymphocyte"]])
    d = decide(_rule(), label, label, np.zeros(2), np.zeros(2), outside_domain=True)
    assert d.review.all()
    assert all(FlagReasonValues.OUTSIDE_DOMAIN in r for r in d.reasons)


def test_switched_off_signals_never_flag_and_survive_json() -> None:
    rule = _rule(uncertainty_threshold=math.inf, disagreement=False)
    raw = json.loads(json.dumps(rule.to_dict()))
    assert raw["uncertainty_threshold"] is None
    again = ReviewRule.from_dict(raw)
    assert again == rule
    d = decide(again, np.array([N["lymphocyte"]]), np.array([N["monocyte"]]), np.array([1.0]),
               np.array([0.0]))
    assert not d.review.any()
    with pytest.raises(ValueError, match="significant_classes"):
        _rule(significant_classes=("blast",))
    # the reference's views travel with the rule; a rule written before them means one view
    eight = _rule(reference_views=8)
    assert ReviewRule.from_dict(json.loads(json.dumps(eight.to_dict()))).reference_views == 8
    assert "reference_views" not in raw or ReviewRule.from_dict(
        {k: v for k, v in raw.items() if k != "reference_views"}).reference_views == 1
    with pytest.raises(ValueError, match="reference_views"):
        _rule(reference_views=0)


def test_the_combined_posterior_weighs_both_models_and_disagreement_stays_the_models() -> None:
    diffusion = np.array([[0.6, 0.4, 0, 0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0, 0, 0, 0]]) + 1e-9
    reference = np.array([[0.1, 0.9, 0, 0, 0, 0, 0, 0], [0.6, 0.4, 0, 0, 0, 0, 0, 0]]) + 1e-9
    alone = combine(diffusion, reference, 1.0)
    assert np.allclose(alone, diffusion / diffusion.sum(axis=1, keepdims=True))
    mixed = combine(diffusion, reference, 0.3)
    assert np.allclose(mixed.sum(axis=1), 1.0)
    # a confident reference outweighs a hesitant diffusion call; agreement stays as it was
    assert mixed.argmax(axis=1).tolist() == [N["eosinophil"], N["neutrophil"]]
    with pytest.raises(ValueError, match="diffusion_weight"):
        combine(diffusion, reference, 1.5)
    with pytest.raises(ValueError, match="diffusion_weight"):
        _rule(diffusion_weight=-0.1)
    # the reported class follows the combination, but the models still disagree on cell 0
    d = decide(_rule(uncertainty_threshold=math.inf), mixed.argmax(axis=1),
               reference.argmax(axis=1), np.zeros(2), np.zeros(2),
               diffusion_label=diffusion.argmax(axis=1))
    assert d.reasons == ((FlagReasonValues.MODELS_DISAGREE,), ())


def test_a_cell_result_carries_every_reason_and_its_words() -> None:
    probabilities = {c: (1.0 if c == "ig" else 0.0) for c in CLASS_NAMES}
    cell = CellResult(cell_id=3, x=5, y=5, outline=((0, 0), (10, 0), (10, 10)), bbox=(0, 0, 10, 10),
                      area_um2=40.0, label="ig", probabilities=probabilities, uncertainty=0.0,
                      anomaly_score=1.0, review=True,
                      review_reasons=("models-disagree", "significant-class"))
    assert cell.review_reasons == (FlagReasonValues.SIGNIFICANT_CLASS, FlagReasonValues.MODELS_DISAGREE)
    assert cell.review_reason == FlagReasonValues.SIGNIFICANT_CLASS
    assert cell.review_labels == ("significant class", "models disagree")
    assert set(FLAG_REASON_LABELS) == set(FlagReasonValues)
    with pytest.raises(ValueError, match="review_reason must be given exactly when review is True"):
        CellResult(cell_id=3, x=5, y=5, outline=((0, 0), (10, 0), (10, 10)), bbox=(0, 0, 10, 10),
                   area_um2=40.0, label="ig", probabilities=probabilities, uncertainty=0.0,
                   anomaly_score=1.0, review=False, review_reasons=("significant-class",))


@pytest.mark.skipif(not (WEIGHTS_DIR / DENSITY_WEIGHTS).is_file() or not AML.is_dir(),
                    reason="shipped review density or aml_dev not present")
def test_a_site_calibration_makes_blasts_of_an_unseen_lab_stand_out(tmp_path: Path) -> None:
    """aml_dev is another lab and scanner, never trained on. `cytonode calibrate-site` on 40 of
    its neutrophils (unlabelled cells of that lab's normal smears); then its myeloblasts, none
    of the eight classes, are "unlike any training class" and its other neutrophils are not."""
    import subprocess
    import sys

    from analysis.framing import collect_image_paths
    from analysis.site import load_site
    from analysis.training.evaluate import AML_BLASTS, AML_NEUTROPHILS, load_folder

    neutrophils = collect_image_paths([AML / AML_NEUTROPHILS])
    site_cells = tmp_path / "site"
    site_cells.mkdir()
    for p in neutrophils[:40]:
        (site_cells / p.name).symlink_to(p)
    data_dir = tmp_path / "var"
    run = subprocess.run([sys.executable, "-m", "dicom_node.app.cli", "calibrate-site", str(site_cells),
                          "--id", "aml-lab", "--data-dir", str(data_dir), "--json"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    # the site's own cells are flagged "unlike any training class" at the rule's chosen share
    share = read_calibration(WEIGHTS_DIR)["review_rule"]["val_normal_flag_rate"]
    assert summary["cells"] == 40 and summary["flag_rate_after"] <= share + 0.03
    # both models read them as a lab they can read: no more unsure than the validated labs
    assert summary["unsure"]["measured"] == 40 and summary["unsure"]["too_many"] is None, summary
    site = load_site(data_dir, "aml-lab")
    assert site.label.startswith("aml-lab (") and site.label.endswith("40 cells)")

    model = ReviewModel.load(WEIGHTS_DIR, read_calibration(WEIGHTS_DIR))
    assert model is not None, f"{WEIGHTS_DIR / CALIBRATION} has no review_rule"
    blasts = load_folder(AML / AML_BLASTS, model.image_size, 30)
    others = load_folder(AML / AML_NEUTROPHILS, model.image_size, 70)[40:]
    images = np.concatenate([blasts, others])
    neutrophil = np.eye(len(CLASS_NAMES))[np.zeros(len(images), np.int64)]
    a = model.assess(neutrophil, np.zeros(len(images)), images, site=site)  # no diffusion run
    assert auroc(a.feature_distance[:30], a.feature_distance[30:]) >= 0.95
    assert a.decision.abnormal[:30].mean() >= 0.8
    assert a.decision.abnormal[30:].mean() <= 0.2
    assert a.decision.review[:30].mean() >= 0.9
    _site_calibrations_follow_the_rule_and_the_network(model, data_dir, share)


def _site_calibrations_follow_the_rule_and_the_network(model: ReviewModel, data_dir: Path,
                                                       share: float) -> None:
    """A calibration keeps the site's distances, so a rule with another share takes its threshold
    from the same cells; one written before that, or with another reference network, is named
    in `calibrate-site --list` (and in every result), and the latter is not used."""
    import subprocess
    import sys

    from analysis.site import load_site
    from analysis.training.evaluate import AML_NEUTROPHILS, load_folder

    site = load_site(data_dir, "aml-lab")
    assert site.flag_share == share and site.reference_sha256 == model.reference_sha256
    assert model.usable_site(site) == (site, ())
    own = model.measure(load_folder(AML / AML_NEUTROPHILS, model.image_size, 40), site)[2]
    for other in (0.05, share, 0.5):
        assert abs(float(np.mean(own > site.threshold_for(other))) - other) <= 0.03
    assert model.rule_for(site).feature_threshold == pytest.approx(site.threshold_for(share))

    raw = json.loads((data_dir / "sites" / "aml-lab.json").read_text())
    before = {k: v for k, v in raw.items()
              if k not in ("flag_share", "distance_quantiles", "reference_sha256")}
    (data_dir / "sites" / "old-lab.json").write_text(json.dumps({**before, "site_id": "old-lab"}))
    (data_dir / "sites" / "moved-lab.json").write_text(json.dumps(
        {**raw, "site_id": "moved-lab", "reference_sha256": "0" * 64}))
    listing = subprocess.run([sys.executable, "-m", "dicom_node.app.cli", "calibrate-site", "--list",
                              "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout
    assert "aml-lab (" in text and "old-lab (" in text and "moved-lab (" in text
    warnings = [line for line in text.splitlines() if line.startswith("  warning: ")]
    assert len(warnings) == 2, text
    assert any("old-lab" in w and "an unrecorded share" in w and "calibrate-site` again" in w
               for w in warnings), text
    assert any("moved-lab" in w and "another reference network" in w and "not used" in w
               for w in warnings), text

    old = load_site(data_dir, "old-lab")
    used, notes = model.usable_site(old)
    assert used is old and len(notes) == 1 and "an unrecorded share" in notes[0]
    assert model.rule_for(old).feature_threshold == old.feature_threshold  # all it has
    used, notes = model.usable_site(load_site(data_dir, "moved-lab"))
    assert used is None and "not used" in notes[0]


def test_calibrate_site_refuses_bad_input(tmp_path: Path) -> None:
    import subprocess
    import sys

    cases = [(["--id", "../etc", str(tmp_path)], "site id"),
             (["--id", "ok", str(tmp_path / "missing")], "does not exist")]
    for extra, message in cases:
        run = subprocess.run([sys.executable, "-m", "dicom_node.app.cli", "calibrate-site", *extra,
                              "--data-dir", str(tmp_path / "var")],
                             capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "var").exists()


def test_the_threshold_for_an_uncalibrated_lab_weighs_every_val_lab_the_same() -> None:
    """The "unlike any training class" threshold of a lab without a site calibration is a quantile
    of val normal cells' distances; drawing ten times more cells of one lab (PBC's val draw)
    must not make it that lab's threshold alone."""
    from types import SimpleNamespace

    from analysis.training.review_rule import normal_quantile

    def val(pbc_cells: int) -> SimpleNamespace:
        near = np.linspace(0.0, 10.0, pbc_cells)  # PBC: close to the training classes
        far = np.linspace(10.0, 20.0, 100)  # another lab: farther
        return SimpleNamespace(labels=np.zeros(pbc_cells + 100, np.int64),
                               lab=np.array(["pbc"] * pbc_cells + ["bccd"] * 100),
                               feature=np.r_[near, far])

    small, large = normal_quantile(val(100), 0.95), normal_quantile(val(1000), 0.95)
    assert abs(small - large) < 0.2
    assert 18.5 < large < 19.5  # the 90th percentile of the far lab: half the weight is each lab's
    # cells of the significant classes (ig) do not count as normal
    mixed = val(100)
    mixed.labels[100:] = CLASS_NAMES.index("ig")
    assert normal_quantile(mixed, 0.95) <= 10.0
