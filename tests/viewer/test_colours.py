"""Class colours are readable where they are drawn: over the red cells of a smear (pinkish) and on
the white page (WCAG 2: at least 3:1 for outlines, 4.5:1 for the class names as text)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicom_node.app.demo import SAMPLE_SLIDE
from viewer.slides import (
    CLASS_COLOURS,
    FLAG_COLOUR,
    RED_CELL_RGB,
    SMEAR_BACKGROUND_RGB,
    contrast_ratio,
)


def test_contrast_ratio_matches_wcag() -> None:
    assert contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast_ratio((255, 255, 255), "#ffffff") == pytest.approx(1.0)
    assert contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)


def test_the_red_cell_reference_is_the_sample_smear() -> None:
    base = max((pydicom.dcmread(p) for p in SAMPLE_SLIDE.glob("*.dcm")),
               key=lambda ds: int(ds.TotalPixelMatrixColumns))
    pixels = base.pixel_array.reshape(-1, 3).astype(np.int32)
    red_cells = pixels[(pixels[:, 0] - pixels[:, 1] > 30) & (pixels[:, 2] > pixels[:, 1])]
    assert len(red_cells) > 0.02 * len(pixels)  # a blood smear: red cells all over it
    median = np.median(red_cells, axis=0)
    assert np.allclose(median, RED_CELL_RGB[0], atol=4), median
    assert np.allclose(np.percentile(red_cells, 25, axis=0), RED_CELL_RGB[1], atol=4)


@pytest.mark.parametrize("name", [*CLASS_COLOURS, "flagged"])
def test_every_class_colour_is_readable_on_red_cells_and_on_the_page(name: str) -> None:
    colour = FLAG_COLOUR if name == "flagged" else CLASS_COLOURS[name]
    for background in (*RED_CELL_RGB, SMEAR_BACKGROUND_RGB):
        assert contrast_ratio(colour, background) >= 3.0, (name, colour, background)
    assert contrast_ratio(colour, "#ffffff") >= 4.5, (name, colour)  # the label on a white card
