"""Cut white cells out of a slide with the one framing every model input gets.

A crop is the square of :data:`analysis.framing.FIELD_OF_VIEW_UM` micrometres centred on the
detected cell, read from the pyramid level nearest the wanted spacing and resized to the
model's input: the same physical framing :mod:`analysis.training.labs` gives every training,
val and test cell of every lab (:func:`analysis.framing.frame_at`), and ``cytonode classify``
gives a single-cell image. Parts of the square outside the slide are mirrored in.

:func:`slide_scale_check` measures the red cells around the crops (median 7.5 um across), so
that a slide whose pixel spacing is wrong is noticed before its cells are trusted.

``docs/contact_sheet.png`` (made by :func:`analysis.training.plots.make_contact_sheet`) shows
slide crops next to framed PBC images so a person can see that the framing matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from analysis.detect import DetectedCell
from analysis.framing import (
    FIELD_OF_VIEW_UM,
    RED_CELL_DIAMETER_UM,
    SCALE_TOLERANCE,
    frame_at,
    red_cell_diameter_px,
)
from analysis.tiles import Slide


@dataclass(frozen=True)
class CropConfig:
    """How crops are framed.

    Parameters
    ----------
    output_size:
        Side of the returned square image in pixels (the model's input size).
    field_of_view_um:
        Side of the framed square in micrometres (:data:`analysis.framing.FIELD_OF_VIEW_UM`).
    """

    output_size: int = 48
    field_of_view_um: float = FIELD_OF_VIEW_UM

    def __post_init__(self) -> None:
        if self.output_size < 8:
            raise ValueError(f"output_size must be >= 8, got {self.output_size}")
        if not self.field_of_view_um > 0:
            raise ValueError(f"field_of_view_um must be > 0, got {self.field_of_view_um}")


def crop_side_um(cell: DetectedCell, config: CropConfig) -> float:
    """Side of the crop around ``cell`` in micrometres (the same for every cell)."""
    del cell  # one framing for every cell: the field of view does not follow the cell's size
    return config.field_of_view_um


@dataclass(frozen=True)
class ScaleCheck:
    """The red-cell ruler on a slide: median red-cell diameter at the slide's pixel spacing.

    ``ratio`` is the measured diameter over 7.5 um; ``ok`` is ``|ratio - 1| <= SCALE_TOLERANCE``;
    ``None`` values when too few red cells were found to tell (``ok`` is then ``None``).
    """

    red_cell_diameter_um: float | None
    crops_measured: int
    ratio: float | None
    ok: bool | None

    def to_dict(self) -> dict[str, object]:
        return {"red_cell_diameter_um": self.red_cell_diameter_um,
                "crops_measured": self.crops_measured, "ratio": self.ratio, "ok": self.ok}


def slide_scale_check(slide: Slide, cells: Sequence[DetectedCell], *, max_cells: int = 24,
                      side_um: float = 40.0, side_px: int = 192) -> ScaleCheck:
    """Measure the red cells in squares of ``side_um`` around up to ``max_cells`` cells.

    Each square is read at ``side_um / side_px`` um/px (by the slide's own spacing) and its
    red cells measured with :func:`analysis.framing.red_cell_diameter_px`; the median over the
    squares is compared with 7.5 um.
    """
    diameters = []
    step = max(1, len(cells) // max_cells)
    config = CropConfig(output_size=side_px, field_of_view_um=side_um)
    for cell in list(cells)[::step][:max_cells]:
        found = red_cell_diameter_px(crop_cell(slide, cell, config))
        if found is not None:
            diameters.append(found[0] * side_um / side_px)
    if len(diameters) < 3:
        return ScaleCheck(None, len(diameters), None, None)
    median = float(np.median(diameters))
    ratio = median / RED_CELL_DIAMETER_UM
    return ScaleCheck(round(median, 3), len(diameters), round(ratio, 3),
                      abs(ratio - 1.0) <= SCALE_TOLERANCE)


def _read_padded(slide: Slide, level_index: int, x0: int, y0: int, side: int) -> NDArray[np.uint8]:
    """Read a square of ``side`` px at ``(x0, y0)``; parts outside the slide repeat its edge."""
    width, height = slide.levels[level_index].size
    rx0, ry0 = max(0, x0), max(0, y0)
    rx1, ry1 = min(width, x0 + side), min(height, y0 + side)
    if rx1 <= rx0 or ry1 <= ry0:
        raise ValueError(f"crop at ({x0}, {y0}) lies outside level {level_index}")
    region = slide.read_region(level_index, (rx0, ry0), (rx1 - rx0, ry1 - ry0))
    pads = (ry0 - y0, y0 + side - ry1, rx0 - x0, x0 + side - rx1)
    if any(pads):  # mirrored in, as analysis.framing.frame_at does
        region = cv2.copyMakeBorder(np.ascontiguousarray(region), *pads,
                                    borderType=cv2.BORDER_REFLECT_101)
    return region


def crop_footprint(slide: Slide, cell: DetectedCell, config: CropConfig) -> tuple[Any, int, int, int]:
    """Where :func:`crop_cell` reads: the pyramid level, the square's origin and side there."""
    side_um = crop_side_um(cell, config)
    level = slide.level_for_spacing(side_um / config.output_size)
    side = max(1, round(side_um / level.pixel_spacing_um))
    cx, cy = cell.x / level.downsample, cell.y / level.downsample
    return level, round(cx - side / 2), round(cy - side / 2), side


def crop_cell(slide: Slide, cell: DetectedCell, config: CropConfig | None = None) -> NDArray[np.uint8]:
    """Return the framed crop of one cell.

    Parameters
    ----------
    slide:
        The slide the cell was found on.
    cell:
        A detected cell (base-level coordinates).
    config:
        Framing (defaults if ``None``).

    Returns
    -------
    numpy.ndarray
        ``(output_size, output_size, 3)`` uint8 RGB, the cell at the centre.
    """
    config = config or CropConfig()
    level, x0, y0, side = crop_footprint(slide, cell, config)
    region = _read_padded(slide, level.index, x0, y0, side)
    return _resize(region, config.output_size)


def crop_cell_from_image(rgb: NDArray[np.uint8], cell: DetectedCell, pixel_spacing_um: float,
                         config: CropConfig | None = None) -> NDArray[np.uint8]:
    """Return the framed crop of one cell of an in-memory field image."""
    config = config or CropConfig()
    return frame_at(rgb, (cell.x, cell.y), pixel_spacing_um, crop_side_um(cell, config),
                    config.output_size)


def iter_crops(slide: Slide, cells: Iterable[DetectedCell],
               config: CropConfig | None = None) -> Iterator[tuple[DetectedCell, NDArray[np.uint8]]]:
    """Yield ``(cell, crop)`` for each cell, reading one small region at a time."""
    for cell in cells:
        yield cell, crop_cell(slide, cell, config)


def _resize(region: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    interpolation = cv2.INTER_AREA if region.shape[0] > size else cv2.INTER_CUBIC
    return np.asarray(cv2.resize(np.ascontiguousarray(region), (size, size),
                                 interpolation=interpolation), dtype=np.uint8)
