"""Cut white cells out of a slide the way the classifier's training images are framed.

PBC images (CellaVision DM96, resized to 160 x 160) show one white cell in the
middle of the frame: a neutrophil of about 12 um spans about 0.4 of the frame
width, and the frame is about 30 um wide. A crop here is a square centred on
the detected cell whose side is ``frame_to_cell`` (3.3, matched by eye on the contact sheet) times the measured cell
diameter, clamped to ``[min_side_um, max_side_um]`` so that a small lymphocyte
keeps some context and a large monocyte is not cut. The side therefore follows
the measured cell size, not only the pixel spacing.

``docs/contact_sheet.png`` (made by :func:`contact_sheet`) shows slide crops
next to PBC images so a person can see that the framing matches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from analysis.detect import DetectedCell
from analysis.tiles import Slide


@dataclass(frozen=True)
class CropConfig:
    """How crops are framed.

    Parameters
    ----------
    output_size:
        Side of the returned square image in pixels (PBC: 160).
    frame_to_cell:
        Crop side divided by the cell's equivalent diameter.
    min_side_um, max_side_um:
        Bounds of the crop side in micrometres.
    """

    output_size: int = 160
    frame_to_cell: float = 3.3
    min_side_um: float = 28.0
    max_side_um: float = 56.0

    def __post_init__(self) -> None:
        if self.output_size < 8:
            raise ValueError(f"output_size must be >= 8, got {self.output_size}")
        if not self.frame_to_cell > 1:
            raise ValueError(f"frame_to_cell must be > 1, got {self.frame_to_cell}")
        if not 0 < self.min_side_um <= self.max_side_um:
            raise ValueError("need 0 < min_side_um <= max_side_um")


def crop_side_um(cell: DetectedCell, config: CropConfig) -> float:
    """Side of the crop around ``cell`` in micrometres."""
    return min(config.max_side_um, max(config.min_side_um, config.frame_to_cell * cell.diameter_um))


def _read_padded(slide: Slide, level_index: int, x0: int, y0: int, side: int) -> NDArray[np.uint8]:
    """Read a square of ``side`` px at ``(x0, y0)``; parts outside the slide repeat its edge."""
    width, height = slide.levels[level_index].size
    rx0, ry0 = max(0, x0), max(0, y0)
    rx1, ry1 = min(width, x0 + side), min(height, y0 + side)
    if rx1 <= rx0 or ry1 <= ry0:
        raise ValueError(f"crop at ({x0}, {y0}) lies outside level {level_index}")
    region = slide.read_region(level_index, (rx0, ry0), (rx1 - rx0, ry1 - ry0))
    pad = ((ry0 - y0, y0 + side - ry1), (rx0 - x0, x0 + side - rx1), (0, 0))
    if any(p for pair in pad for p in pair):
        region = np.pad(region, pad, mode="edge")
    return region


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
    side_um = crop_side_um(cell, config)
    wanted_spacing = side_um / config.output_size
    level = slide.level_for_spacing(wanted_spacing)
    side = math.ceil(side_um / level.pixel_spacing_um)
    cx, cy = cell.x / level.downsample, cell.y / level.downsample
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    region = _read_padded(slide, level.index, x0, y0, side)
    return _resize(region, config.output_size)


def crop_cell_from_image(rgb: NDArray[np.uint8], cell: DetectedCell, pixel_spacing_um: float,
                         config: CropConfig | None = None) -> NDArray[np.uint8]:
    """Return the framed crop of one cell of an in-memory field image."""
    config = config or CropConfig()
    side = math.ceil(crop_side_um(cell, config) / pixel_spacing_um)
    x0, y0 = round(cell.x - side / 2), round(cell.y - side / 2)
    h, w = rgb.shape[:2]
    pad = ((max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w)), (0, 0))
    region = rgb[max(0, y0):y0 + side, max(0, x0):x0 + side]
    if any(p for pair in pad for p in pair):
        region = np.pad(region, pad, mode="edge")
    return _resize(region, config.output_size)


def iter_crops(slide: Slide, cells: Iterable[DetectedCell],
               config: CropConfig | None = None) -> Iterator[tuple[DetectedCell, NDArray[np.uint8]]]:
    """Yield ``(cell, crop)`` for each cell, reading one small region at a time."""
    for cell in cells:
        yield cell, crop_cell(slide, cell, config)


def _resize(region: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    interpolation = cv2.INTER_AREA if region.shape[0] > size else cv2.INTER_CUBIC
    return np.asarray(cv2.resize(np.ascontiguousarray(region), (size, size),
                                 interpolation=interpolation), dtype=np.uint8)


def contact_sheet(rows: Sequence[tuple[str, Sequence[NDArray[np.uint8]]]], path: Path,
                  tile: int = 128) -> Path:
    """Write a PNG with one labelled row of images per entry.

    Parameters
    ----------
    rows:
        ``(caption, images)`` pairs; images are resized to ``tile`` x ``tile``.
    path:
        PNG to write.
    tile:
        Side of each shown image.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    columns = max(len(images) for _, images in rows)
    caption_h = 18
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, len(rows) * (tile + caption_h + 6) + 4),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, images) in enumerate(rows):
        top = 4 + r * (tile + caption_h + 6)
        draw.text((6, top + 2), caption, fill=(0, 0, 0))
        for c, image in enumerate(images):
            im = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tile, tile))
            sheet.paste(im, (4 + c * (tile + 4), top + caption_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def make_contact_sheet(slide_path: Path, pbc_dir: Path, out: Path, per_row: int = 8,
                       config: CropConfig | None = None) -> Path:
    """Write the contact sheet: crops from a slide above PBC images of the same size.

    Parameters
    ----------
    slide_path:
        A WSI DICOM series (file or folder).
    pbc_dir:
        The PBC folder (one sub-folder per class).
    out:
        PNG to write.
    per_row:
        Images per row.
    config:
        Crop framing (defaults if ``None``).

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from analysis.detect import find_cells

    config = config or CropConfig()
    with Slide.open(slide_path) as slide:
        cells = find_cells(slide).cells
        crops = [crop for _, crop in iter_crops(slide, cells, config)]
    pbc: list[NDArray[np.uint8]] = []
    for cls in ("neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil", "ig",
                "neutrophil", "eosinophil"):
        files = sorted((pbc_dir / cls).glob("*.jpg"))
        if files:
            with Image.open(files[len(pbc) % len(files)]) as im:
                pbc.append(np.asarray(im.convert("RGB").resize((config.output_size,) * 2)))
    rows: list[tuple[str, Sequence[NDArray[np.uint8]]]] = []
    for start in range(0, min(len(crops), 2 * per_row), per_row):
        rows.append((f"slide crops (cytonode detect + crops), cells {start + 1}-"
                     f"{min(len(crops), start + per_row)}", crops[start:start + per_row]))
    rows.append(("PBC training images (CellaVision, 160 x 160)", pbc[:per_row]))
    return contact_sheet(rows, out)
