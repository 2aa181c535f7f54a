"""The measurement behind "a site the node cannot read" (analysis.training.site_readable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis.review import ReviewRule, unsure
from analysis.training.site_readable import main, site_case, slide_marks

RULE = ReviewRule(uncertainty_threshold=0.317, feature_threshold=12.0, disagreement=True,
                  diffusion_weight=0.3, uncertainty_of="combined", site_unsure_share=0.2941)


def _sure(labels: np.ndarray, mass: float = 0.97) -> np.ndarray:
    """Posteriors over the 8 classes, ``mass`` on each cell's ``labels``."""
    p = np.full((len(labels), 8), (1.0 - mass) / 7)
    p[np.arange(len(labels)), labels] = mass
    return p


def _torn(p: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``p`` with ``cells`` spread evenly over three classes (a cell no model is sure of)."""
    p = p.copy()
    p[cells] = 0.0
    p[cells, :3] = 1.0 / 3
    return p


def test_unsure_counts_the_uncertain_and_the_disagreeing_cells() -> None:
    labels = np.array([0, 1, 2, 3])
    p_d = _torn(_sure(labels, 0.999), np.array([2]))
    # the reference calls cell 3 a 4, so sure of it that the combined posterior is too
    p_r = _torn(_sure(np.array([0, 1, 2, 4]), 0.999), np.array([2]))
    assert unsure(RULE, p_d, p_r).tolist() == [False, False, True, True]
    quiet = ReviewRule(**{**RULE.to_dict(), "disagreement": False, "significant_classes": ("ig",)})
    assert unsure(quiet, p_d, p_r).tolist() == [False, False, True, False]


def test_a_site_read_badly_is_marked_and_one_read_well_is_not() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    # read well: both models sure and right, but for a tenth of the cells no model is sure of
    torn = np.flatnonzero(rng.random(300) < 0.1)
    good = site_case(RULE, 0.2941, _torn(_sure(labels), torn), _torn(_sure(labels), torn), labels)
    assert good["cells"] == 200 and 0.0 < good["share"] < 0.2  # at most 200 cells are read
    assert not good["marked"] and good["agrees"]
    # read badly: the reference calls every cell the next class, the diffusion model its own
    wrong = (labels + 1) % 5
    bad = site_case(RULE, 0.2941, _sure(labels), _sure(wrong), labels)
    assert bad["marked"] and bad["share"] == 1.0 and bad["agrees"]
    assert bad["reported_balanced_accuracy"] < 0.85


def test_slides_are_judged_only_with_enough_cells() -> None:
    flags = np.array([True] * 9 + [True] * 8 + [False] * 4)
    slides = np.array(["small"] * 9 + ["big"] * 12)
    marks, judged, marked = slide_marks(flags, slides, 0.2941)
    assert judged == 1 and marked == 1  # 8 of 12 unsure: p < 0.01; 9 of 9 is too few to judge
    assert marks.tolist() == [False] * 9 + [True] * 12


def test_held_out_cases_come_from_posteriors_files_alone(tmp_path: Path) -> None:
    """`site_readable held-out` scores a lab never trained on without a review_signals folder:
    only its train cells count, under the shipped rule's share (0.2941)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 120)
    split = np.array(["train"] * 80 + ["val"] * 40)
    # the train cells: the models disagree on every one; the val cells (not scored): they agree
    wrong = np.where(split == "train", (labels + 1) % 5, labels)
    np.savez(tmp_path / "lolo.npz", p_diff=_sure(labels), p_ref=_sure(wrong), labels=labels,
             paths=np.array([f"c{i}.jpg" for i in range(120)]), lab=np.array(["chula"] * 120),
             split=split)
    out = tmp_path / "site.json"
    assert main(["held-out", "--held-out", str(tmp_path / "lolo.npz"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["site_unsure_share"] == 0.2941
    (case,) = result["sites"].values()
    assert case["cells"] == 80 and case["unsure"] == 80 and case["marked"]
