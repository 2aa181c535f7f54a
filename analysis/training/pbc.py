"""Loading the PBC single-cell dataset (Acevedo et al. 2020, CC BY 4.0)."""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.classes import CLASS_NAMES, check_class_names
from analysis.errors import DatasetError
from analysis.framing import FIELD_OF_VIEW_UM, RED_CELL_DIAMETER_UM, frame_at

SPLITS = ("train", "val", "test")
#: The frame of the PBC images in micrometres, measured with the node's red-cell ruler
#: (:func:`analysis.framing.red_cell_diameter_px`): the median red cell spans 0.203 of the
#: width (1,006 images; 10-90 %: 0.184-0.224).
PBC_FRAME_UM = RED_CELL_DIAMETER_UM / 0.203


@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """Images as ``uint8`` array ``(N, H, W, 3)`` with class indices ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]

    def take(self, index: np.ndarray) -> LabelledImages:
        """The images at ``index``, in that order."""
        return LabelledImages(self.images[index], self.labels[index],
                              tuple(self.paths[i] for i in index))


def read_split(root: Path, split: str, classes: tuple[str, ...] = CLASS_NAMES
               ) -> list[tuple[str, int]]:
    """Relative paths and class indices of one split of ``splits.csv``.

    Parameters
    ----------
    classes:
        The classes to keep, in model order: a label is its index in
        ``classes``, and rows of any other class are left out (a model trained
        without one class, for leave-one-class-out, passes its own list).
    """
    check_class_names(classes)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    table = root / "splits.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found: is {root} the PBC folder?")
    rows: list[tuple[str, int]] = []
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == split and row["label"] in classes:
                rows.append((row["path"], classes.index(row["label"])))
    return rows


def load_images(
    root: Path, rows: list[tuple[str, int]], size: int, *, progress: bool = False,
    field_of_view_um: float = FIELD_OF_VIEW_UM,
) -> LabelledImages:
    """Decode the listed images and frame each (:func:`analysis.framing.frame_at`): the square of
    ``field_of_view_um`` around the centre, ``size`` x ``size`` RGB."""
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, (rel, _) in enumerate(rows):
        with Image.open(root / rel) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        images[i] = frame_at(rgb, (w / 2, h / 2), PBC_FRAME_UM / w, field_of_view_um, size)
        if progress and (i + 1) % 2000 == 0:
            print(f"loaded {i + 1}/{len(rows)} images", file=sys.stderr, flush=True)
    labels = np.array([label for _, label in rows], dtype=np.int64)
    return LabelledImages(images, labels, tuple(rel for rel, _ in rows))
