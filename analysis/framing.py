"""Framing single-cell images the way the training images were framed.

The PBC training images are centre crops of the CellaVision tiles, resized to
160x160 and then (in :mod:`analysis.pbc`) to the model's input size with
LANCZOS. An image of any size from any source gets the same treatment: the
largest centred square, then a LANCZOS resize to the model's side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from analysis.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def frame_image(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop ``image`` to a square and resize it to ``size`` x ``size`` RGB.

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


def read_framed(path: Path, size: int) -> np.ndarray:
    """Read one image file and frame it (see :func:`frame_image`).

    Raises
    ------
    DatasetError
        If the file is missing or not a readable image.
    """
    try:
        with Image.open(path) as im:
            return frame_image(im, size)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


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
