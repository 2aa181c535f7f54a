"""The slide scale check measures red cells in native pixels: a wrong claimed spacing shows.

Real BCCD fields (true spacing 0.0823 um/px: their red cells are 91 px across) are made into
slides whose Pixel Measures claim the truth, 1.3 x the truth and 0.75 x the truth. The pixels are
the same every time, so the red cells must measure the same in native pixels and scale with the
claim in um: the truth passes, both wrong claims fail. (``bench/scale_check.py`` runs more
claims and field sets.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.crops import (
    RULER_SIDES_PX,
    RULER_TARGET_FRACTION,
    ScaleCheck,
    _self_consistent_side,
    slide_scale_check,
)
from analysis.detect import DEFAULT_FIELD_PIXEL_SPACING_UM as TRUTH_UM
from analysis.detect import find_cells
from analysis.tiles import Slide
from dicom_node.make_slide import make_slide
from tests.analysis.conftest import bccd_image

#: One-white-cell BCCD fields, none of them on the sample slide.
FIELDS = (7, 11, 12, 13, 14, 16)


def _check(tmp_path: Path, claim_um: float) -> ScaleCheck:
    files = make_slide([bccd_image(i) for i in FIELDS], tmp_path / f"slide_{claim_um:.4f}",
                       columns=3, gap_um=16.0 * claim_um / TRUTH_UM, pixel_spacing_um=claim_um)
    with Slide.open(files) as slide:
        assert slide.pixel_spacing_um == pytest.approx(claim_um)
        return slide_scale_check(slide, find_cells(slide).cells)


def test_wrong_claimed_spacing_fails_the_scale_check(tmp_path: Path, bccd: Path) -> None:
    del bccd  # skips when the data is absent
    checks = {factor: _check(tmp_path, TRUTH_UM * factor) for factor in (1.0, 1.3, 0.75)}
    truth, large, small = checks[1.0], checks[1.3], checks[0.75]
    assert truth.ok is True and abs(truth.ratio - 1.0) < 0.1, truth  # type: ignore[operator]
    assert truth.crops_measured >= 5
    assert large.ok is False and large.ratio > 1.15, large  # type: ignore[operator]
    assert small.ok is False and small.ratio < 0.85, small  # type: ignore[operator]
    # the same native pixels: the red cells measure the same in pixels whatever the claim
    native = [c.red_cell_diameter_um / (TRUTH_UM * f)  # type: ignore[operator]
              for f, c in checks.items()]
    assert max(native) / min(native) < 1.06, native
    assert 80 < float(np.median(native)) < 102, native  # BCCD red cells: about 91 px


def test_self_consistent_side_takes_the_crossing_at_the_largest_sides() -> None:
    sides = list(RULER_SIDES_PX[:7])  # 128 .. 1024
    t = RULER_TARGET_FRACTION
    # chance circles in squares smaller than a red cell cross the target first; ignored
    fractions = [np.nan, t * 0.98, t * 1.2, t * 1.2, t * 1.0, t * 0.75, t * 0.7]
    assert _self_consistent_side(sides, fractions) == sides[4]
    fractions = [np.nan, np.nan, t * 1.3, t * 1.3, t * 0.9 ** 2, t * 0.7, t * 0.7]
    side = _self_consistent_side(sides, fractions)
    assert side is not None and sides[3] < side < sides[4]
    assert _self_consistent_side(sides, [np.nan] * 7) is None
    assert _self_consistent_side(sides, [t * 0.5] * 7) == sides[0]  # no crossing: nearest


def test_too_few_cells_are_not_measured(sample_slide: Path) -> None:
    with Slide.open(sample_slide) as slide:
        cells = find_cells(slide).cells
        check = slide_scale_check(slide, cells[:2])
    assert check == ScaleCheck(None, 0, None, None)
