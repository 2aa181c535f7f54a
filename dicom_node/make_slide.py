"""Build VL Whole Slide Microscopy series from field images or vendor slide files.

Two ways in:

- :func:`make_slide` lays real smear field images (for example BCCD) out as a
  mosaic, writes it as a pyramidal, tiled, JPEG-compressed OME-TIFF with
  :mod:`tifffile` (one tile at a time, so a 40,000 x 40,000 px slide never sits
  in memory) and converts that with :mod:`wsidicomizer`, which copies the JPEG
  tiles into the DICOM frames without re-encoding them.
- :func:`convert_slide` converts a whole-slide file that OpenSlide, OpenTile or
  TiffSlide reads (SVS, NDPI, MRXS, OME-TIFF, generic tiled TIFF). Formats with
  JPEG tiles that OpenTile understands are copied without re-encoding; others
  are decoded and re-encoded as JPEG.

Every instance gets the same patient, study and series, a specimen description
(a blood smear on a microscope slide, Wright stain), a slide label with a
barcode, pixel spacing, an optical path (brightfield, full spectrum) and a
TILED_FULL dimension organisation (PS3.3 C.8.12.4, C.7.6.17).

:func:`run_make_slide` is ``cytonode make-slide`` (registered in :mod:`dicom_node.app.commands`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import shutil
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from analysis.detect import DEFAULT_FIELD_PIXEL_SPACING_UM

logger = logging.getLogger(__name__)

#: Suffixes read as single field images; anything else goes to :func:`convert_slide`.
FIELD_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})

#: Estimated pixel spacing of BCCD fields (``analysis.detect``: the red-cell ruler).
BCCD_PIXEL_SPACING_UM = DEFAULT_FIELD_PIXEL_SPACING_UM


@dataclass(frozen=True)
class SlideDescription:
    """Patient, study, series and specimen attributes written to every instance.

    Parameters
    ----------
    patient_name, patient_id:
        Patient Module (PS3.3 C.7.1.1).
    study_id, accession_number, study_description:
        General Study Module (PS3.3 C.7.2.1).
    series_description, series_number:
        General Series Module (PS3.3 C.7.3.1).
    slide_identifier:
        Container Identifier of the slide; also the label barcode value.
    label_text:
        Text printed on the slide label.
    stain:
        Stain meaning from CID 8112, e.g. ``"Wright stain"``.
    manufacturer, model_name:
        Equipment Module.
    """

    patient_name: str = "BCCD^Anonymous"
    patient_id: str = "BCCD-0001"
    study_id: str = "1"
    accession_number: str = "CYTO0001"
    study_description: str = "Peripheral blood smear"
    series_description: str = "Blood smear, Wright stain"
    series_number: int = 1
    slide_identifier: str = "CYTO-BCCD-0001"
    label_text: str = "BCCD blood smear, Wright"
    stain: str = "Wright stain"
    manufacturer: str = "CytoNode"
    model_name: str = "cytonode make-slide"

    def __post_init__(self) -> None:
        if not self.slide_identifier or len(self.slide_identifier) > 64:
            raise ValueError("slide_identifier must be 1 to 64 characters (LO)")
        if not 0 < self.series_number < 2**31:
            raise ValueError(f"series_number must be a positive IS, got {self.series_number}")
        if not self.patient_id:
            raise ValueError("patient_id must not be empty")


def _wsi_metadata(description: SlideDescription, pixel_spacing_um: float | None) -> object:
    """Build the :class:`wsidicom.metadata.WsiMetadata` for a slide."""
    from pydicom.sr.codedict import codes
    from wsidicom.conceptcode import (
        IlluminationCode,
        IlluminationColorCode,
        SpecimenStainsCode,
    )
    from wsidicom.geometry import SizeMm
    from wsidicom.metadata import (
        Equipment,
        Label,
        OpticalPath,
        Patient,
        Pyramid,
        Series,
        Slide,
        SlideSample,
        Staining,
        Study,
        WsiMetadata,
    )
    from wsidicom.metadata import (
        Image as ImageMetadata,
    )

    now = datetime.datetime.now()
    stain = SpecimenStainsCode(description.stain)
    image = ImageMetadata(
        acquisition_datetime=now,
        pixel_spacing=(SizeMm(pixel_spacing_um / 1000.0, pixel_spacing_um / 1000.0)
                       if pixel_spacing_um else None),
    )
    optical_path = OpticalPath(
        identifier="1",
        description="Brightfield, white light",
        illumination_types=[IlluminationCode("Brightfield illumination")],
        illumination=IlluminationColorCode("Full Spectrum"),
    )
    return WsiMetadata(
        study=Study(identifier=description.study_id, date=now.date(), time=now.time().replace(microsecond=0),
                    accession_number=description.accession_number,
                    description=description.study_description,
                    referring_physician_name=""),
        series=Series(number=description.series_number, description=description.series_description),
        patient=Patient(name=description.patient_name, identifier=description.patient_id),
        equipment=Equipment(manufacturer=description.manufacturer, model_name=description.model_name,
                            device_serial_number="0", software_versions=["cytonode 0.1"]),
        slide=Slide(
            identifier=description.slide_identifier,
            stainings=[Staining(substances=[stain])],
            samples=[SlideSample(identifier=f"{description.slide_identifier}-S1",
                                 anatomical_sites=[codes.SCT.Blood],
                                 short_description="Peripheral blood smear")],
        ),
        pyramid=Pyramid(image=image, optical_paths=[optical_path]),
        label=Label(text=description.label_text, barcode=description.slide_identifier,
                    contains_phi=False),
    )


class _Mosaic:
    """Field images on a grid, rendered tile by tile at any pyramid level.

    Parameters
    ----------
    images:
        Field image files, used in order and repeated to fill the grid.
    columns, rows:
        Grid shape in fields.
    field_size:
        ``(width, height)`` each field is centre-cropped to.
    gap:
        Pixels of empty glass between neighbouring fields, filled with the first field's glass
        colour, so that a cell's crop never shows part of the next field across a seam.
    """

    def __init__(self, images: Sequence[Path], columns: int, rows: int,
                 field_size: tuple[int, int], gap: int = 0) -> None:
        self.images = list(images)
        self.columns = columns
        self.rows = rows
        self.field_size = field_size
        self.gap = gap
        self.size = (columns * (field_size[0] + gap) - gap, rows * (field_size[1] + gap) - gap)
        self._cache: OrderedDict[tuple[int, int], NDArray[np.uint8]] = OrderedDict()
        self.background = self._glass_colour() if gap else np.array([255, 255, 255], np.uint8)

    def _glass_colour(self) -> NDArray[np.uint8]:
        """The median colour of the brightest fifth of the first field (the glass)."""
        field = self._field(0, 0).reshape(-1, 3)
        brightness = field.astype(np.int32).sum(axis=1)
        glass = field[brightness >= np.quantile(brightness, 0.8)]
        return np.median(glass, axis=0).astype(np.uint8)

    def level_size(self, level: int) -> tuple[int, int]:
        return (max(1, self.size[0] >> level), max(1, self.size[1] >> level))

    def _field(self, index: int, level: int) -> NDArray[np.uint8]:
        key = (index % len(self.images), level)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        with Image.open(self.images[key[0]]) as source:
            im: Image.Image = source.convert("RGB")
            fw, fh = self.field_size
            left, top = (im.width - fw) // 2, (im.height - fh) // 2
            im = im.crop((left, top, left + fw, top + fh))
            if level:
                x0, x1 = self._edges(level, fw)
                y0, y1 = self._edges(level, fh)
                im = im.resize((max(1, x1 - x0), max(1, y1 - y0)), Image.Resampling.BOX)
            array = np.asarray(im, dtype=np.uint8)
        self._cache[key] = array
        if len(self._cache) > 96:
            self._cache.popitem(last=False)
        return array

    @staticmethod
    def _edges(level: int, length: int) -> tuple[int, int]:
        return 0, max(1, round(length / (1 << level)))

    def _field_origin(self, col: int, row: int, level: int) -> tuple[int, int]:
        return (round(col * (self.field_size[0] + self.gap) / (1 << level)),
                round(row * (self.field_size[1] + self.gap) / (1 << level)))

    def _field_end(self, col: int, row: int, level: int) -> tuple[int, int]:
        return (round((col * (self.field_size[0] + self.gap) + self.field_size[0]) / (1 << level)),
                round((row * (self.field_size[1] + self.gap) + self.field_size[1]) / (1 << level)))

    def render(self, level: int, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        """Return the ``(h, w, 3)`` region at ``(x, y)`` of ``level``."""
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = self.background
        fw = (self.field_size[0] + self.gap) / (1 << level)
        fh = (self.field_size[1] + self.gap) / (1 << level)
        for row in range(max(0, int(y // fh) - 1), min(self.rows, int((y + h) // fh) + 2)):
            for col in range(max(0, int(x // fw) - 1), min(self.columns, int((x + w) // fw) + 2)):
                ox, oy = self._field_origin(col, row, level)
                nx, ny = self._field_end(col, row, level)
                if nx <= x or ny <= y or ox >= x + w or oy >= y + h:
                    continue
                field = self._field(row * self.columns + col, level)
                field = field[: ny - oy, : nx - ox]
                if field.shape[0] < ny - oy or field.shape[1] < nx - ox:  # rounding: pad by edge
                    field = np.pad(field, ((0, ny - oy - field.shape[0]), (0, nx - ox - field.shape[1]),
                                           (0, 0)), mode="edge")
                sx0, sy0 = max(x, ox), max(y, oy)
                sx1, sy1 = min(x + w, nx), min(y + h, ny)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = field[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
        return out

    def tiles(self, level: int, tile: int) -> Iterator[NDArray[np.uint8]]:
        """Yield ``(tile, tile, 3)`` tiles of ``level`` in row-major order (edges padded)."""
        width, height = self.level_size(level)
        for ty in range(0, height, tile):
            for tx in range(0, width, tile):
                w, h = min(tile, width - tx), min(tile, height - ty)
                region = self.render(level, tx, ty, w, h)
                if (w, h) != (tile, tile):
                    region = np.pad(region, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")
                yield region


def _write_ome_tiff(mosaic: _Mosaic, path: Path, pixel_spacing_um: float, tile_size: int,
                    jpeg_quality: int) -> int:
    """Write the mosaic as a pyramidal, tiled, JPEG OME-TIFF; return the level count."""
    import tifffile

    levels = 1
    while max(mosaic.level_size(levels - 1)) > tile_size:
        levels += 1
    options: dict[str, Any] = {"tile": (tile_size, tile_size), "compression": "jpeg",
               "compressionargs": {"level": jpeg_quality}, "photometric": "rgb",
               "dtype": np.uint8}
    resolution = 1e4 / pixel_spacing_um  # pixels per cm
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        width, height = mosaic.level_size(0)
        tif.write(mosaic.tiles(0, tile_size), shape=(height, width, 3), subifds=levels - 1,
                  resolution=(resolution, resolution), resolutionunit="CENTIMETER",
                  metadata={"axes": "YXS", "PhysicalSizeX": pixel_spacing_um,
                            "PhysicalSizeXUnit": "µm", "PhysicalSizeY": pixel_spacing_um,
                            "PhysicalSizeYUnit": "µm"},
                  **options)
        for level in range(1, levels):
            width, height = mosaic.level_size(level)
            tif.write(mosaic.tiles(level, tile_size), shape=(height, width, 3), subfiletype=1,
                      **options)
    return levels


def _field_size(images: Sequence[Path]) -> tuple[int, int]:
    """Common field size: the smallest width and height, rounded down to even."""
    widths, heights = [], []
    for path in dict.fromkeys(images):
        with Image.open(path) as im:
            widths.append(im.width)
            heights.append(im.height)
    return (min(widths) // 2 * 2, min(heights) // 2 * 2)


def make_slide(images: list[Path], out_dir: Path, *, columns: int | None = None,
               rows: int | None = None, repeat: int = 1,
               pixel_spacing_um: float = BCCD_PIXEL_SPACING_UM, tile_size: int = 256,
               jpeg_quality: int = 90, description: SlideDescription | None = None,
               gap_um: float = 0.0) -> list[Path]:
    """Assemble field images into a VL Whole Slide Microscopy series.

    Parameters
    ----------
    images:
        Field images (PNG, JPEG or BMP); cropped to a common size and laid out
        row by row, repeated in order until the grid is full.
    out_dir:
        Folder for the DICOM files (created; must be empty if it exists).
    columns, rows:
        Grid shape in fields. By default ``columns = ceil(sqrt(n))`` and
        ``rows = ceil(n / columns)`` with ``n = len(images) * repeat``.
    repeat:
        How many times the image list is used (to build large slides from a
        few fields).
    pixel_spacing_um:
        Pixel spacing of the fields (BCCD: :data:`BCCD_PIXEL_SPACING_UM`).
    tile_size:
        Frame size (square), a multiple of 16.
    jpeg_quality:
        JPEG quality of the frames, 1 to 100.
    description:
        Patient, study, series and specimen attributes.
    gap_um:
        Empty glass between neighbouring fields, in micrometres (0: fields touch). Half the
        classifier's field of view or more keeps every cell's crop inside its own field.

    Returns
    -------
    list[pathlib.Path]
        The written instances, base level first.

    Raises
    ------
    ValueError
        If an argument breaks its rule or an image is not a field image.
    FileNotFoundError
        If an image does not exist.
    """
    images = [Path(p) for p in images]
    if not images:
        raise ValueError("images must not be empty")
    for path in images:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.suffix.lower() not in FIELD_IMAGE_SUFFIXES:
            raise ValueError(f"{path}: not a field image ({', '.join(sorted(FIELD_IMAGE_SUFFIXES))})")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
    if not pixel_spacing_um > 0:
        raise ValueError(f"pixel_spacing_um must be > 0, got {pixel_spacing_um}")
    if not 0.0 <= gap_um <= 1000.0:
        raise ValueError(f"gap_um must lie in [0, 1000], got {gap_um}")
    n = len(images) * repeat
    if columns is None:
        columns = math.ceil(math.sqrt(n)) if rows is None else math.ceil(n / rows)
    if rows is None:
        rows = math.ceil(n / columns)
    if columns < 1 or rows < 1:
        raise ValueError(f"columns and rows must be >= 1, got {columns} x {rows}")
    description = description or SlideDescription()
    try:
        field_size = _field_size(images)
    except OSError as exc:
        raise ValueError(f"cannot read field image: {exc}") from exc
    mosaic = _Mosaic(images, columns, rows, field_size, round(gap_um / pixel_spacing_um))
    with tempfile.TemporaryDirectory(prefix="cytonode-slide-") as tmp:
        tiff = Path(tmp) / "mosaic.ome.tiff"
        levels = _write_ome_tiff(mosaic, tiff, pixel_spacing_um, tile_size, jpeg_quality)
        logger.info("mosaic %d x %d fields, %d x %d px, %d levels", columns, rows,
                    *mosaic.size, levels)
        return _convert(tiff, out_dir, description, pixel_spacing_um, tile_size)


def convert_slide(path: Path, out_dir: Path, *, description: SlideDescription | None = None,
                  pixel_spacing_um: float | None = None, tile_size: int = 512) -> list[Path]:
    """Convert a vendor whole-slide file into a VL Whole Slide Microscopy series.

    Parameters
    ----------
    path:
        A file OpenTile, TiffSlide or OpenSlide reads (SVS, NDPI, MRXS,
        OME-TIFF, generic tiled TIFF).
    out_dir:
        Folder for the DICOM files (created; must be empty if it exists).
    description:
        Patient, study, series and specimen attributes.
    pixel_spacing_um:
        Overrides the file's pixel spacing (needed when the file has none).
    tile_size:
        Frame size where tiles must be re-encoded.

    Returns
    -------
    list[pathlib.Path]
        The written instances.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If no reader supports the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _convert(path, out_dir, description or SlideDescription(), pixel_spacing_um, tile_size)


def _convert(source: Path, out_dir: Path, description: SlideDescription,
             pixel_spacing_um: float | None, tile_size: int) -> list[Path]:
    """Run wsidicomizer on ``source``; write into ``out_dir``."""
    with _pydicom_config_kept():
        from wsidicomizer import WsiDicomizer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir}: output folder is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = _wsi_metadata(description, pixel_spacing_um)
    try:
        with _pydicom_config_kept():
            files = WsiDicomizer.convert(
                source, out_dir, metadata=metadata, tile_size=tile_size,
                include_label=False, include_overview=False, include_thumbnail=False,
                add_missing_levels=True,
            )
    except NotImplementedError as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise ValueError(f"{source}: no reader supports this file ({exc})") from exc
    written = [Path(f) for f in files]
    return sorted(written, key=lambda p: -_total_pixels(p))


@contextlib.contextmanager
def _pydicom_config_kept() -> Iterator[None]:
    """Undo the process-wide pydicom settings wsidicomizer changes.

    Importing :mod:`wsidicomizer` calls ``pydicom.config.future_behavior()``
    and sets ``enforce_valid_values``; left in place, that changes how every
    other module in the process (the node, the tests) reads and writes DICOM.
    """
    from pydicom import config

    saved = (config._use_future, config.settings.reading_validation_mode,
             config.settings.writing_validation_mode)
    try:
        yield
    finally:
        config._use_future = saved[0]
        config.settings.reading_validation_mode = saved[1]
        config.settings.writing_validation_mode = saved[2]


def _total_pixels(path: Path) -> int:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.TotalPixelMatrixColumns) * int(ds.TotalPixelMatrixRows)


def run_make_slide(args: argparse.Namespace) -> int:
    """Run ``cytonode make-slide``; print the written files as JSON; return the exit status."""
    description = SlideDescription(patient_id=args.patient_id, patient_name=args.patient_name,
                                   slide_identifier=args.slide_id)
    images: list[Path] = args.images
    fields = [p for p in images if p.suffix.lower() in FIELD_IMAGE_SUFFIXES]
    if fields and len(fields) != len(images):
        raise ValueError("give either field images or one vendor slide file, not both")
    if not fields:
        if len(images) != 1:
            raise ValueError("a vendor slide is converted one file at a time")
        files = convert_slide(images[0], args.out, description=description,
                              pixel_spacing_um=args.pixel_spacing_um)
    else:
        files = make_slide(fields, args.out, columns=args.columns, rows=args.rows,
                           repeat=args.repeat,
                           pixel_spacing_um=args.pixel_spacing_um or BCCD_PIXEL_SPACING_UM,
                           tile_size=args.tile_size, jpeg_quality=args.jpeg_quality,
                           description=description, gap_um=args.gap_um)
    json.dump({"files": [str(f) for f in files]}, sys.stdout)
    sys.stdout.write("\n")
    return 0
