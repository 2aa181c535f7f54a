"""The labelled cells of every lab we have, framed the one way the node frames cells.

Three labs of single white cells (``../shared/data``), each brought to the same
physical framing (:mod:`analysis.framing`: a square of ``field_of_view_um``
micrometres centred on the cell):

- **PBC** (Acevedo et al. 2020, CC BY 4.0; CellaVision DM96): 160 x 160 centre
  crops whose median red cell spans 0.203 of the width, i.e. a frame of
  7.5 / 0.203 = 36.9 um. The split is ``pbc/splits.csv``.
- **Chula** (Chulalongkorn University, MIT): 200 x 200 crops whose side is 2.5 x
  the cell's box in the field (``cell_box_px``); the fields' pixel spacing
  follows from their red cells. Split by field in ``chula_wbc/labels.csv``.
- **BCCD** (MIT): 640 x 480 smear fields with VOC boxes; a field is a labelled
  cell when it has exactly one WBC box and one subtype label. The cell is cut
  from the field around its box centre at the fixed BCCD pixel spacing, which
  is also the spacing ``cytonode make-slide`` writes for BCCD fields. The split,
  by field, is the committed ``bccd_splits.csv`` (:func:`write_bccd_splits`); the
  fields of the bundled sample slide are all in ``test``.

Every loader returns :class:`LabCells` (uint8 images at ``size`` plus labels in
the fixed class order), so training, evaluation and the benches read the labs
the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.classes import CLASS_NAMES
from analysis.detect import DEFAULT_FIELD_PIXEL_SPACING_UM
from analysis.errors import DatasetError
from analysis.framing import frame_at
from analysis.training.pbc import load_images, read_split

LABS = ("pbc", "bccd", "chula")
SPLITS = ("train", "val", "test")
# Each lab's scale is measured with the node's own red-cell ruler
# (:func:`analysis.framing.red_cell_diameter_px`), so training and the slide path agree.
#: Chula: pixel spacing of the fields (median over 306 crops whose red cells were measured,
#: each crop's side being 2.5 x its cell's box ``cell_box_px``).
CHULA_FIELD_SPACING_UM = 0.0973
CHULA_CROP_TO_BOX = 2.5
#: BCCD: median red cell 91 px across (360 fields), i.e. 7.5 / 91 um/px; ``cytonode make-slide``
#: writes this spacing for BCCD fields.
BCCD_PIXEL_SPACING_UM = DEFAULT_FIELD_PIXEL_SPACING_UM
#: The BCCD fields of the bundled sample slide (``dicom_node/data/sample_slide``): always test.
SAMPLE_SLIDE_FIELDS = (0, 8, 9, 10, 15, 20)
BCCD_SPLITS = Path(__file__).resolve().parent / "bccd_splits.csv"
_BCCD_LABELS = {"NEUTROPHIL": "neutrophil", "EOSINOPHIL": "eosinophil", "BASOPHIL": "basophil",
                "LYMPHOCYTE": "lymphocyte", "MONOCYTE": "monocyte"}


@dataclasses.dataclass(frozen=True)
class LabCells:
    """Framed cells of one lab and split: ``images`` uint8 ``(N, S, S, 3)``, ``labels`` ``(N,)``
    (index into the class order the loader was given), ``paths`` where each came from."""

    lab: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> LabCells:
        return LabCells(self.lab, self.split, self.images[index], self.labels[index],
                        tuple(self.paths[i] for i in index))

    def per_class(self, n: int, seed: int = 0) -> LabCells:
        """At most ``n`` cells of each class (the first ``n`` of a seeded shuffle)."""
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for c in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == c)
            keep.extend(rng.permutation(idx)[:n].tolist())
        return self.take(np.array(sorted(keep), dtype=np.int64))


def concat(parts: Sequence[LabCells]) -> LabCells:
    """One :class:`LabCells` of several (``lab`` joined with '+')."""
    if not parts:
        raise ValueError("parts must not be empty")
    return LabCells("+".join(p.lab for p in parts), parts[0].split,
                    np.concatenate([p.images for p in parts]),
                    np.concatenate([p.labels for p in parts]),
                    tuple(x for p in parts for x in p.paths))


def _check(lab: str, split: str) -> None:
    if lab not in LABS:
        raise ValueError(f"lab must be one of {LABS}, not {lab!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def load_lab(data_root: Path, lab: str, split: str, size: int, field_of_view_um: float,
             classes: tuple[str, ...] = CLASS_NAMES) -> LabCells:
    """Load and frame every labelled cell of ``lab``'s ``split``.

    Parameters
    ----------
    data_root:
        The shared data folder (``pbc/``, ``bccd/``, ``chula_wbc/`` inside).
    size:
        Side of the returned images in pixels.
    field_of_view_um:
        Side of the framed square in micrometres (:data:`analysis.framing.FIELD_OF_VIEW_UM`).
    classes:
        The model's classes, in order; cells of other classes are left out.
    """
    _check(lab, split)
    if lab == "pbc":
        return load_pbc(data_root / "pbc", split, size, field_of_view_um, classes)
    if lab == "chula":
        return _load_chula(data_root / "chula_wbc", split, size, field_of_view_um, classes)
    return _load_bccd(data_root / "bccd", split, size, field_of_view_um, classes)


def load_splits(data_root: Path, lab: str, splits: str, size: int, field_of_view_um: float,
                classes: tuple[str, ...] = CLASS_NAMES) -> LabCells:
    """:func:`load_lab` of several splits joined with '+' (``"train+val"``) as one set."""
    return concat([load_lab(data_root, lab, split, size, field_of_view_um, classes)
                   for split in splits.split("+")])


def chula_series(path: str) -> str:
    """The image series of a Chula cell: the prefix of its field's name (``B-59`` of
    ``basophil/B-59_0012_0.jpg``). Each series is one class's slide or session; the upstream
    ``valid/`` fields (our test split) are mostly of series that train and val never hold."""
    return path.rsplit("/", 1)[-1].split("_", 1)[0]


@functools.lru_cache(maxsize=4)
def chula_train_series(data_root: Path) -> frozenset[str]:
    """The image series of Chula's train split (read from its ``labels.csv``)."""
    with (data_root / "chula_wbc" / "labels.csv").open(newline="") as fh:
        return frozenset(chula_series(row["path"]) for row in csv.DictReader(fh)
                         if row["split"] == "train")


def _frame_file(path: Path, spacing_um: float, size: int, fov_um: float) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    return frame_at(rgb, (w / 2, h / 2), spacing_um, fov_um, size)


def _finish(lab: str, split: str, images: list[np.ndarray], labels: list[int],
            paths: list[str], size: int) -> LabCells:
    array = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
    return LabCells(lab, split, array, np.array(labels, dtype=np.int64), tuple(paths))


def load_pbc(root: Path, split: str, size: int, fov_um: float,
             classes: tuple[str, ...] = CLASS_NAMES) -> LabCells:
    """PBC's ``split`` from the PBC folder ``root`` (the one with ``splits.csv``)."""
    rows = read_split(root, split, classes)
    data = load_images(root, rows, size, field_of_view_um=fov_um)
    return LabCells("pbc", split, data.images, data.labels,
                    tuple(f"pbc/{rel}" for rel in data.paths))


def _load_chula(root: Path, split: str, size: int, fov_um: float,
                classes: tuple[str, ...]) -> LabCells:
    table = root / "labels.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found: is {root} the Chula folder?")
    field_spacing = CHULA_FIELD_SPACING_UM
    images, labels, paths = [], [], []
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] != split or row["label"] not in classes:
                continue
            path = root / row["path"]
            with Image.open(path) as im:
                width = im.width
            spacing = CHULA_CROP_TO_BOX * float(row["cell_box_px"]) * field_spacing / width
            images.append(_frame_file(path, spacing, size, fov_um))
            labels.append(classes.index(row["label"]))
            paths.append(f"chula_wbc/{row['path']}")
    return _finish("chula", split, images, labels, paths, size)


@dataclasses.dataclass(frozen=True)
class BccdField:
    """One BCCD field: its index, image path, WBC boxes ``(x0, y0, x1, y1)`` and subtype label(s)."""

    index: int
    image: Path
    wbc_boxes: tuple[tuple[int, int, int, int], ...]
    labels: tuple[str, ...]

    @property
    def single_cell_label(self) -> str | None:
        """The class of its one white cell, or ``None`` (no or several WBCs or labels)."""
        if len(self.wbc_boxes) == 1 and len(self.labels) == 1:
            return self.labels[0]
        return None


def bccd_fields(root: Path) -> list[BccdField]:
    """Every BCCD field with its WBC boxes and subtype labels (``wbc_subtype_labels.csv``)."""
    table = root / "wbc_subtype_labels.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found: is {root} the BCCD folder?")
    labels: dict[int, tuple[str, ...]] = {}
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            names = [p.strip().upper() for p in (row["Category"] or "").split(",") if p.strip()]
            labels[int(row["Image"])] = tuple(_BCCD_LABELS[n] for n in names if n in _BCCD_LABELS)
    fields = []
    for xml in sorted((root / "BCCD" / "Annotations").glob("BloodImage_*.xml")):
        index = int(xml.stem.split("_")[1])
        tree = ET.parse(xml)
        boxes = []
        for obj in tree.iter("object"):
            if (obj.findtext("name") or "").strip() != "WBC":
                continue
            bb = obj.find("bndbox")
            assert bb is not None
            boxes.append(tuple(int(float(bb.findtext(k) or 0))
                               for k in ("xmin", "ymin", "xmax", "ymax")))
        image = root / "BCCD" / "JPEGImages" / f"{xml.stem}.jpg"
        if image.is_file():
            fields.append(BccdField(index, image, tuple(boxes),  # type: ignore[arg-type]
                                    labels.get(index, ())))
    return fields


def write_bccd_splits(root: Path, out: Path = BCCD_SPLITS, seed: int = 20261204) -> Path:
    """Split the single-cell BCCD fields by field, per class 60/20/20 (train/val/test).

    The sample slide's fields are test. Written once and committed; the loaders read the file.
    """
    by_class: dict[str, list[int]] = {}
    for f in bccd_fields(root):
        label = f.single_cell_label
        if label is not None and f.index not in SAMPLE_SLIDE_FIELDS:
            by_class.setdefault(label, []).append(f.index)
    rows = [(i, "test") for i in SAMPLE_SLIDE_FIELDS]
    rng = random.Random(seed)
    for label in sorted(by_class):
        idx = sorted(by_class[label])
        rng.shuffle(idx)
        n_val = round(0.2 * len(idx))
        n_test = round(0.2 * len(idx))
        rows += [(i, "val") for i in idx[:n_val]]
        rows += [(i, "test") for i in idx[n_val:n_val + n_test]]
        rows += [(i, "train") for i in idx[n_val + n_test:]]
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["field", "split"])
        writer.writerows(sorted(rows))
    return out


def bccd_split(split: str) -> set[int]:
    """The BCCD field indices of ``split`` (``bccd_splits.csv``)."""
    with BCCD_SPLITS.open(newline="") as fh:
        return {int(r["field"]) for r in csv.DictReader(fh) if r["split"] == split}


def _load_bccd(root: Path, split: str, size: int, fov_um: float,
               classes: tuple[str, ...]) -> LabCells:
    wanted = bccd_split(split)
    images, labels, paths = [], [], []
    for f in bccd_fields(root):
        label = f.single_cell_label
        if f.index not in wanted or label is None or label not in classes:
            continue
        x0, y0, x1, y1 = f.wbc_boxes[0]
        with Image.open(f.image) as im:
            rgb = np.asarray(im.convert("RGB"))
        images.append(frame_at(rgb, ((x0 + x1) / 2, (y0 + y1) / 2), BCCD_PIXEL_SPACING_UM,
                               fov_um, size))
        labels.append(classes.index(label))
        paths.append(f"bccd/BCCD/JPEGImages/{f.image.name}")
    return _finish("bccd", split, images, labels, paths, size)
