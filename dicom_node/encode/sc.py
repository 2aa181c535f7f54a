"""The flagged cells as one picture any PACS shows: a Secondary Capture gallery (PS3.3 A.8.1).

A grid of the crops of the cells flagged for review or suspected abnormal, each labelled with
its cell number and predicted class, as one RGB Secondary Capture Image (SOP class
``1.2.840.10008.5.1.4.1.1.7``) in the slide's study, series :data:`SC_SERIES_NUMBER`, made with
the preliminary SR. The crops are the framing the classifier saw (:mod:`analysis.crops`, the
same square the viewer's gallery shows). At most :data:`MAX_GALLERY_CELLS` cells: suspected
abnormal cells first, then the others by cell number; the title says when cells were left out.

:func:`encode_flagged_gallery` is pure (crops in, object out); :func:`read_flagged_crops`
reads the crops from the slide the job opened.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from analysis.results import CellResult, SlideResult
from dicom_node.encode.common import EncoderParams, base_level, contributing_equipment, new_uid
from dicom_node.encode.pdf import class_name

if TYPE_CHECKING:
    from analysis.tiles import Slide

#: Series Number of the gallery (SR 900, ANN 901, SEG 902, final SR 903, PDF 904, final PDF 906).
SC_SERIES_NUMBER = 905
#: Most cells one gallery shows.
MAX_GALLERY_CELLS = 64
#: Side of one crop in the gallery, pixels.
TILE = 144
_COLUMNS = 8
_LABEL_H = 34
_GAP = 6
_TITLE_H = 44
_ABNORMAL = (200, 30, 30)
_REVIEW = (230, 140, 0)


def gallery_cells(result: SlideResult) -> list[CellResult]:
    """The cells the gallery shows, in order: suspected abnormal first, then by cell number."""
    flagged = [c for c in result.cells if c.review or c.abnormal]
    return sorted(flagged, key=lambda c: (not c.abnormal, c.cell_id))[:MAX_GALLERY_CELLS]


def read_flagged_crops(result: SlideResult, slide: Slide | Sequence[Path], *,
                       size: int = TILE) -> dict[int, NDArray[np.uint8]]:
    """Crop the gallery's cells from the slide, ``{cell_id: (size, size, 3) uint8}``.

    ``slide`` is the slide the job opened (read, left open), or its files (opened here at the
    result's pixel spacing, then closed). The field of view is the one the result was classified
    with (its provenance parameter ``field_of_view_um``, else
    :data:`analysis.framing.FIELD_OF_VIEW_UM`).
    """
    from analysis.tiles import Slide

    cells = gallery_cells(result)
    if not cells:
        return {}
    if isinstance(slide, Slide):
        return _crops(result, slide, cells, size)
    default_um = 1000.0 * result.pixel_spacing_mm[1]
    with Slide.open(list(slide), default_pixel_spacing_um=default_um) as opened:
        return _crops(result, opened, cells, size)


def _crops(result: SlideResult, slide: Slide, cells: Sequence[CellResult],
           size: int) -> dict[int, NDArray[np.uint8]]:
    from analysis.crops import CropConfig, crop_cell
    from analysis.detect import DetectedCell
    from analysis.framing import FIELD_OF_VIEW_UM

    field_um = float(result.provenance.parameters.get("field_of_view_um", FIELD_OF_VIEW_UM))
    config = CropConfig(output_size=size, field_of_view_um=field_um)
    crops = {}
    for cell in cells:
        detected = DetectedCell(x=cell.x, y=cell.y, bbox=cell.bbox, outline=cell.outline,
                                area_um2=cell.area_um2, nucleus_area_um2=0.0,
                                diameter_um=2.0 * math.sqrt(cell.area_um2 / math.pi))
        crops[cell.cell_id] = crop_cell(slide, detected, config)
    return crops


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                      "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def _columns(count: int) -> int:
    return max(1, min(_COLUMNS, count))


def tile_origin(index: int, count: int) -> tuple[int, int]:
    """Top left ``(x, y)`` in the gallery of the crop of the ``index``-th of ``count`` cells."""
    columns = _columns(count)
    return (_GAP + (index % columns) * (TILE + _GAP),
            _TITLE_H + (index // columns) * (TILE + _LABEL_H + _GAP))


def render_gallery(cells: Sequence[CellResult], crops: Mapping[int, NDArray[np.uint8]],
                   title: str) -> NDArray[np.uint8]:
    """The gallery picture: ``title`` on top, one labelled tile per cell (row-major order).

    A suspected abnormal cell has a red frame, a cell flagged for review an orange one.
    Raises ``ValueError`` if a cell has no crop.
    """
    missing = [c.cell_id for c in cells if c.cell_id not in crops]
    if missing:
        raise ValueError(f"crops lack cells {missing}")
    columns = _columns(len(cells))
    rows = max(1, math.ceil(len(cells) / columns))
    width = max(columns * (TILE + _GAP) + _GAP, 560)
    height = _TITLE_H + rows * (TILE + _LABEL_H + _GAP) + _GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title_font, label_font = _font(15), _font(12)
    for i, text in enumerate(title.split("\n")[:2]):
        draw.text((_GAP, 4 + 19 * i), text, fill=(0, 0, 0), font=title_font)
    for index, cell in enumerate(cells):
        x, y = tile_origin(index, len(cells))
        crop = np.asarray(crops[cell.cell_id], dtype=np.uint8)
        tile = Image.fromarray(crop[..., :3]).convert("RGB")
        if tile.size != (TILE, TILE):
            tile = tile.resize((TILE, TILE), Image.Resampling.LANCZOS)
        canvas.paste(tile, (x, y))
        colour = _ABNORMAL if cell.abnormal else _REVIEW
        draw.rectangle((x - 2, y - 2, x + TILE + 1, y + TILE + 1), outline=colour, width=2)
        mark = "suspected abnormal" if cell.abnormal else "review"
        draw.text((x, y + TILE + 3), f"#{cell.cell_id}  {mark}", fill=colour, font=label_font)
        draw.text((x, y + TILE + 18), class_name(cell.label.value), fill=(0, 0, 0), font=label_font)
    return np.asarray(canvas, dtype=np.uint8)


def gallery_title(result: SlideResult, shown: int) -> str:
    flagged = sum(1 for c in result.cells if c.review or c.abnormal)
    first = (f"Flagged cells: {flagged} (review {len(result.review_cells)}, suspected abnormal "
             f"{len(result.abnormal_cells)})")
    if shown < flagged:
        first += f"; showing {shown}"
    return first + "\nCell number and predicted class. PRELIMINARY, UNVERIFIED"


def encode_flagged_gallery(
    result: SlideResult,
    source_datasets: Sequence[Dataset],
    crops: Mapping[int, NDArray[np.uint8]],
    params: EncoderParams,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture gallery of the flagged cells, in the slide's study.

    Parameters
    ----------
    result:
        The analysis result; it must have at least one flagged cell.
    source_datasets:
        The slide's instances (pixel data not needed).
    crops:
        ``{cell_id: RGB uint8 crop}`` of at least the cells :func:`gallery_cells` picks
        (:func:`read_flagged_crops` reads them).

    Raises
    ------
    ValueError
        If no cell is flagged, a crop is missing, or the sources are not the result's slide.
    """
    source = base_level(result, source_datasets)
    cells = gallery_cells(result)
    if not cells:
        raise ValueError("the result has no flagged cell: there is no gallery to make")
    pixels = render_gallery(cells, crops, gallery_title(result, len(cells)))
    specimens = [hd.SpecimenDescription.from_dataset(item)
                 for item in source.get("SpecimenDescriptionSequence", [])]
    gallery = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="SLIDE",
        series_instance_uid=new_uid(series_instance_uid),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=new_uid(sop_instance_uid),
        instance_number=1,
        manufacturer=params.manufacturer,
        container_identifier=str(source.ContainerIdentifier),
        specimen_descriptions=specimens,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(result, params),
        series_description="Flagged cells gallery (preliminary, unverified)",
        manufacturer_model_name=params.manufacturer_model_name,
        software_versions=params.software_versions,
        device_serial_number=params.device_serial_number,
        institution_name=params.institution_name,
    )
    # General Image (PS3.3 C.7.6.1): Patient Orientation is Type 2C, required when the image needs
    # neither Image Orientation (Patient) nor (Slide), as a Secondary Capture does. highdicom
    # writes it only for PATIENT coordinates; a slide has no patient orientation: empty (Type 2).
    gallery.PatientOrientation = []
    return gallery
