"""Cut white cells out of a slide with the one framing every model input gets.

A crop is the square of :data:`analysis.framing.FIELD_OF_VIEW_UM` micrometres centred on the
detected cell, read from the pyramid level nearest the wanted spacing and resized to the
model's input: the same physical framing :mod:`analysis.training.labs` gives every training,
val and test cell of every lab (:func:`analysis.framing.frame_at`), and ``cytonode classify``
gives a single-cell image. Parts of the square outside the slide are mirrored in.

:func:`slide_scale_check` measures the red cells around the crops (median 7.5 um across) in the
slide's native pixels, and only then converts them with the claimed pixel spacing, so that a
slide whose pixel spacing is wrong is noticed before its cells are trusted.

``docs/contact_sheet.png`` (made by :func:`analysis.training.plots.make_contact_sheet`) shows
slide crops next to framed PBC images so a person can see that the framing matches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
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
    red_cell_radii,
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


#: Where the ruler looks: Hough circles with radii 4-20 % of a square's side, i.e. diameters 8-40 %
#: (:func:`analysis.framing.red_cell_diameter_px`'s range), and the square whose red cells span
#: the range's geometric middle, sqrt(0.08 x 0.40) ~ 18 % of its side, is the one measured.
#: (At that framing a BCCD field's red cells measure the 91 px their spacing was set from.)
RULER_TARGET_FRACTION = 0.18
#: Square sides tried, in NATIVE base-level pixels: 128 to 2048 by factors of sqrt(2), so red
#: cells from about 16 to 500 native pixels across can be framed at the target fraction.
RULER_SIDES_PX = tuple(round(128 * 2 ** (k / 2)) for k in range(9))
#: The measurement pools, around each cell, squares of 3 sides (the chosen one and 2^(+-1/4) of
#: it) at 5 places (centred, and moved a quarter side along each diagonal): Hough's circles on
#: one square are few and scattered, and pooling 15 squares a cell keeps the median steady
#: (the same pixels told six spacings measured within about 3 %, against 17-22 % from one square
#: a cell: bench/scale_check.py, BCCD slides of 6 cells).
RULER_SIDE_FACTORS = (2 ** -0.25, 1.0, 2 ** 0.25)
RULER_OFFSETS = ((0.0, 0.0), (0.25, 0.25), (0.25, -0.25), (-0.25, 0.25), (-0.25, -0.25))
#: About how many squares the measurement reads in all (time: ~2 ms a square): all 5 offsets
#: up to 8 cells, the first ``RULER_SQUARES // (3 x cells)`` of them (at least 1) beyond.
RULER_SQUARES = 120


def slide_scale_check(slide: Slide, cells: Sequence[DetectedCell], *, max_cells: int = 24,
                      probe_cells: int = 8, side_px: int = 192) -> ScaleCheck:
    """Measure the red cells around up to ``max_cells`` cells in native pixels, then in um.

    The measurement is in the slide's native (base-level) pixels, so a wrong claimed spacing
    cannot rescale it; the spacing only converts the result to um.

    1. Squares of each side in :data:`RULER_SIDES_PX` native pixels are read around up to
       ``probe_cells`` of the cells (:func:`crop_cell` with a field of view of the side times the
       spacing, so the spacing cancels: from the coarsest level that keeps at least ``side_px``
       pixels across, resized to ``side_px``) and Hough circles with radii
       4-20 % of the side found on their green channel (:func:`analysis.framing.red_cell_radii`, as
       :func:`analysis.framing.red_cell_diameter_px` does).
    2. Hough finds circles at whatever scale its range allows, so the side is chosen by
       self-consistency (:func:`_self_consistent_side`): the side at which the median circle
       spans :data:`RULER_TARGET_FRACTION` of the square.
    3. Around each of up to ``max_cells`` cells, squares of that side times
       :data:`RULER_SIDE_FACTORS`, at :data:`RULER_OFFSETS` (fractions of the side; all five
       up to 8 cells, fewer beyond, about :data:`RULER_SQUARES` squares in all), are
       measured; the median of all circles from squares with 3 or more is the red cells'
       diameter in native pixels, times ``slide.pixel_spacing_um`` (the claimed spacing) the
       diameter in um, compared with 7.5 um (:data:`analysis.framing.SCALE_TOLERANCE`).

    Returns
    -------
    ScaleCheck
        ``crops_measured`` counts the cells with at least one square of 3 or more circles;
        fewer than 3 such cells (or no side at which circles were found): ``None`` values and
        ``ok`` ``None``.
    """
    chosen = list(cells)[::max(1, len(cells) // max_cells)][:max_cells]
    if len(chosen) < 3:
        return ScaleCheck(None, 0, None, None)
    probes = chosen[::max(1, len(chosen) // probe_cells)][:probe_cells]
    short = min(slide.size)
    sides = [s for s in RULER_SIDES_PX if s <= short] or [short]
    fractions = []
    for side in sides:  # a side counts only where 3 or more probe squares hold 3+ circles
        probed = [d for d in (_red_cell_diameters(slide, cell, side, side_px) for cell in probes)
                  if d is not None]
        fractions.append(float(np.median(np.concatenate(probed))) / side
                         if len(probed) >= min(3, len(probes)) else np.nan)
    side_native = _self_consistent_side(sides, fractions)
    if side_native is None:
        return ScaleCheck(None, 0, None, None)
    # at most about RULER_SQUARES squares in all: every offset for a few cells, fewer for many
    offsets = RULER_OFFSETS[:max(1, min(len(RULER_OFFSETS),
                                        RULER_SQUARES // (len(RULER_SIDE_FACTORS) * len(chosen))))]
    pooled: list[NDArray[np.float64]] = []
    measured = 0
    for cell in chosen:
        found: list[NDArray[np.float64]] = []
        for factor in RULER_SIDE_FACTORS:
            side = max(8, min(short, round(side_native * factor)))
            for dx, dy in offsets:
                d = _red_cell_diameters(slide, cell, side, side_px, (dx * side, dy * side))
                if d is not None:
                    found.append(d)
        if found:
            pooled.extend(found)
            measured += 1
    if measured < 3:
        return ScaleCheck(None, measured, None, None)
    median = float(np.median(np.concatenate(pooled))) * slide.pixel_spacing_um
    ratio = median / RED_CELL_DIAMETER_UM
    return ScaleCheck(round(median, 3), measured, round(ratio, 3),
                      abs(ratio - 1.0) <= SCALE_TOLERANCE)


def _self_consistent_side(sides: Sequence[int], fractions: Sequence[float]) -> int | None:
    """The side (native px) at which the median circle spans :data:`RULER_TARGET_FRACTION`.

    ``fractions[k]`` is the median circle's diameter over ``sides[k]`` (NaN where too few
    squares held circles); it falls as the side grows, since the red cells keep their size.
    Squares smaller than a red cell hold only chance circles whose fraction may cross the
    target too, so the crossing taken is the one at the LARGEST sides: between the last pair of
    measured neighbours with the fraction at or above the target then below it, interpolated in
    log side. No crossing: the measured side nearest the target. ``None`` if none was measured.
    """
    logs = np.log(np.asarray(sides, dtype=float))
    q = np.log(np.asarray(fractions, dtype=float) / RULER_TARGET_FRACTION)
    finite = np.flatnonzero(np.isfinite(q))
    if finite.size == 0:
        return None
    for a, b in reversed(list(itertools.pairwise(finite))):
        if b == a + 1 and q[a] >= 0 > q[b]:
            t = q[a] / (q[a] - q[b])
            return round(float(np.exp(logs[a] + t * (logs[b] - logs[a]))))
    return int(sides[int(finite[np.argmin(np.abs(q[finite]))])])


def _red_cell_diameters(slide: Slide, cell: DetectedCell, side: int, side_px: int,
                        offset: tuple[float, float] = (0.0, 0.0)) -> NDArray[np.float64] | None:
    """Diameters (native px) of the Hough circles in the square of ``side`` native px centred
    ``offset`` native px from ``cell``; ``None`` when the square holds fewer than 3 circles."""
    # crop_cell's square of side x spacing um is ``side`` native px: the claimed spacing cancels
    square = crop_cell(slide, replace(cell, x=cell.x + offset[0], y=cell.y + offset[1]),
                       CropConfig(output_size=side_px, field_of_view_um=side * slide.pixel_spacing_um))
    radii = red_cell_radii(square[..., 1])
    return 2.0 * radii * side / side_px if radii.size >= 3 else None


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
