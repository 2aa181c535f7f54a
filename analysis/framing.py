"""The one framing of a cell, in physical units, and the red-cell ruler that checks the scale.

Every cell a model sees, in training, ``cytonode classify``, ``cytonode analyze`` and the
node's job, is the square of :data:`FIELD_OF_VIEW_UM` micrometres centred on the cell,
resized to the model's input (:func:`frame_at`). The pixel spacing comes from the slide's
Pixel Measures, from ``--pixel-spacing``, or from the red cells around the cell: a normal
red cell is about 7.5 um across (:func:`red_cell_diameter_px`), which also checks a given
spacing (off by more than 15 %: the scale check fails).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from analysis.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Median diameter of a normal red cell, the ruler of every framing and scale check.
RED_CELL_DIAMETER_UM = 7.5
#: Side of the square every cell is framed in, in micrometres, everywhere: training, ``cytonode
#: classify``, ``cytonode analyze`` and the node's job (chosen on val: model card, "Framing").
FIELD_OF_VIEW_UM = 26.0


def frame_at(rgb: np.ndarray, centre: tuple[float, float], pixel_spacing_um: float,
             field_of_view_um: float, size: int) -> np.ndarray:
    """Cut the square of ``field_of_view_um`` around ``centre`` and resize it to ``size``.

    The one framing definition in physical units. Parts of the square outside ``rgb`` are
    mirrored in from the image (no flat bands that a model could learn as a lab's mark).

    Parameters
    ----------
    rgb:
        ``uint8`` image ``(H, W, 3)``.
    centre:
        ``(x, y)`` of the cell in pixels of ``rgb``.
    pixel_spacing_um:
        Micrometres per pixel of ``rgb``.
    field_of_view_um:
        Side of the framed square in micrometres.
    size:
        Side of the returned image in pixels.

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(size, size, 3)``.
    """
    if not pixel_spacing_um > 0:
        raise ValueError(f"pixel_spacing_um must be positive, not {pixel_spacing_um}")
    if not field_of_view_um > 0:
        raise ValueError(f"field_of_view_um must be positive, not {field_of_view_um}")
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    side = max(1, round(field_of_view_um / pixel_spacing_um))
    x0, y0 = round(centre[0] - side / 2), round(centre[1] - side / 2)
    h, w = rgb.shape[:2]
    pads = (max(0, -y0), max(0, y0 + side - h), max(0, -x0), max(0, x0 + side - w))
    region = np.ascontiguousarray(rgb[max(0, y0):y0 + side, max(0, x0):x0 + side, :3])
    if any(pads):
        if region.size == 0:
            raise ValueError(f"centre {centre} lies outside the {w}x{h} image")
        region = cv2.copyMakeBorder(region, *pads, borderType=cv2.BORDER_REFLECT_101)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return np.asarray(cv2.resize(region, (size, size), interpolation=interpolation), np.uint8)


def red_cell_diameter_px(rgb: np.ndarray) -> tuple[float, int] | None:
    """Median diameter of the red cells in ``rgb`` (pixels) and how many were measured.

    Red cells are the round, pale, anucleate discs around a white cell. They are
    found as circles (OpenCV's Hough gradient method) on the green channel, whose
    contrast between red cell and glass is highest in Romanowsky stains; radii from
    4 % to 20 % of the shorter side. ``None`` when fewer than 3 circles are found.
    """
    h, w = rgb.shape[:2]
    short = min(h, w)
    scale = 256 / short if short > 256 else 1.0
    green = np.ascontiguousarray(rgb[..., 1])
    if scale != 1.0:
        green = cv2.resize(green, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    radii = red_cell_radii(green)
    if radii.size < 3:
        return None
    return float(2 * np.median(radii) / scale), len(radii)


def red_cell_radii(green: np.ndarray) -> np.ndarray:
    """Radii (px) of the red cells OpenCV's Hough gradient method finds on a green channel
    (blurred first, sigma 1.5 px): radii 4-20 % of the shorter side; empty if none."""
    green = cv2.GaussianBlur(np.ascontiguousarray(green), (0, 0), 1.5)
    s = min(green.shape[:2])
    circles = cv2.HoughCircles(green, cv2.HOUGH_GRADIENT, dp=1, minDist=max(4, s // 12),
                               param1=60, param2=18, minRadius=max(3, s // 25),
                               maxRadius=max(5, s // 5))
    return np.zeros(0) if circles is None else circles[0, :, 2].astype(np.float64)


def estimate_pixel_spacing_um(rgb: np.ndarray) -> tuple[float, int] | None:
    """Pixel spacing implied by the red cells (7.5 um median diameter), and the count used."""
    found = red_cell_diameter_px(rgb)
    if found is None:
        return None
    diameter, n = found
    return RED_CELL_DIAMETER_UM / diameter, n


def frame_image(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop ``image`` to a square and resize it to ``size`` x ``size`` RGB.

    Geometry only, no physical scale: for pictures that are not cell images (contact
    sheets). Cells are framed with :func:`frame_at` / :func:`read_framed`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``(size, size, 3)``.
    """
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    rgb = image.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))


@dataclasses.dataclass(frozen=True)
class FramedImage:
    """A single-cell image framed for a model, with the scale it was framed at.

    ``spacing_source`` is ``"given"`` (``--pixel-spacing``) or ``"red cells"`` (estimated from
    ``red_cells`` of them); ``scale_ok`` is ``False`` when a given spacing disagrees with the
    red cells by more than 15 %, ``None`` when it could not be checked.
    """

    image: np.ndarray
    pixel_spacing_um: float
    spacing_source: str
    red_cells: int
    scale_ok: bool | None


#: A spacing whose red cells measure more than this fraction off 7.5 um fails the scale check.
SCALE_TOLERANCE = 0.15


def frame_cell_image(rgb: np.ndarray, size: int, pixel_spacing_um: float | None = None,
                     field_of_view_um: float = FIELD_OF_VIEW_UM) -> FramedImage:
    """Frame the cell at the centre of a single-cell image (:func:`frame_at`).

    Parameters
    ----------
    pixel_spacing_um:
        Micrometres per pixel of ``rgb``; ``None``: estimated from its red cells.

    Raises
    ------
    DatasetError
        If no spacing is given and too few red cells are found to estimate one.
    """
    h, w = rgb.shape[:2]
    found = estimate_pixel_spacing_um(rgb)
    if pixel_spacing_um is None:
        if found is None:
            raise DatasetError("too few red cells to estimate the pixel spacing; "
                               "give it with --pixel-spacing UM")
        spacing, n = found
        framed = frame_at(rgb, (w / 2, h / 2), spacing, field_of_view_um, size)
        return FramedImage(framed, spacing, "red cells", n, None)
    ok = None if found is None else abs(found[0] / pixel_spacing_um - 1.0) <= SCALE_TOLERANCE
    framed = frame_at(rgb, (w / 2, h / 2), pixel_spacing_um, field_of_view_um, size)
    return FramedImage(framed, pixel_spacing_um, "given", 0 if found is None else found[1], ok)


#: Sides, in pixels, an image of one cell can have. Smaller shows no cell; larger shows far more
#: than the 26 um of :data:`FIELD_OF_VIEW_UM` even at the finest ``--pixel-spacing`` (0.01 um).
CELL_IMAGE_MIN_SIDE = 16
CELL_IMAGE_MAX_SIDE = 4096


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header only (nothing is decoded).

    Raises
    ------
    DatasetError
        If the file is missing or not an image, or claims more pixels than PIL decodes at all
        (twice ``Image.MAX_IMAGE_PIXELS``: a decompression bomb).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # callers bound size
            with Image.open(path) as im:
                return int(im.width), int(im.height)
    except Image.DecompressionBombError:
        # PIL says only how many pixels; the header has the sides.
        width, height = _png_header_size(path) or (0, 0)
        size = f"{width} x {height} pixels" if width else "too many pixels"
        raise DatasetError(f"{path}: {size}: too large to decode (a decompression bomb?)") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc})") from None


def _png_header_size(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as fp:
        head = fp.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def check_image_size(path: Path, min_side: int, max_side: int, what: str) -> tuple[int, int]:
    """Check from its header that an image's sides lie in ``[min_side, max_side]`` pixels.

    Raises
    ------
    DatasetError
        Naming the file, its size and the bounds, if not; see also :func:`image_size`.
    """
    width, height = image_size(path)
    if min(width, height) < min_side or max(width, height) > max_side:
        raise DatasetError(f"{path}: {width} x {height} pixels is not {what} (each side must be "
                           f"{min_side} to {max_side} pixels)")
    return width, height


def read_image(path: Path) -> np.ndarray:
    """Decode one image file to ``uint8`` RGB.

    Raises
    ------
    DatasetError
        If the file is missing or not a readable image.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def read_framed(path: Path, size: int, pixel_spacing_um: float | None = None) -> np.ndarray:
    """Read one single-cell image file and frame it (see :func:`frame_cell_image`).

    Raises
    ------
    DatasetError
        If the file is missing, not a readable image, or its scale cannot be estimated.
    """
    rgb = read_image(path)
    try:
        return frame_cell_image(rgb, size, pixel_spacing_um).image
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc


def collect_image_paths(inputs: list[Path]) -> list[Path]:
    """Expand files and folders into a sorted list of PNG/JPEG/BMP files.

    Folders are searched recursively. A named file must exist and have one of
    :data:`IMAGE_SUFFIXES`.

    Raises
    ------
    DatasetError
        If a path does not exist, a named file is not an image, or nothing is found.
    """
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(f"{item} is not a PNG, JPEG or BMP file")
            paths.append(item)
        else:
            raise DatasetError(f"{item} does not exist")
    if not paths:
        raise DatasetError("no PNG, JPEG or BMP images found in " + ", ".join(map(str, inputs)))
    return paths


def folder_spacing_um(paths: list[Path]) -> float:
    """One lab's pixel spacing: the median of the red-cell estimates of its images.

    Raises
    ------
    DatasetError
        If fewer than 3 images have red cells to measure.
    """
    estimates = [found[0] for found in (estimate_pixel_spacing_um(read_image(p)) for p in paths)
                 if found is not None]
    if len(estimates) < 3:
        raise DatasetError(f"too few images with red cells to estimate the pixel spacing of "
                           f"{paths[0].parent if paths else 'an empty folder'}")
    return float(np.median(estimates))
