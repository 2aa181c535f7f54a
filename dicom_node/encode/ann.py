"""Every cell as Microscopy Bulk Simple Annotations: outlines (and centres) grouped by class.

Coordinates are 3D (SCOORD3D) points in the slide coordinate system of the
slide's frame of reference, in mm, mapped from the base level's image
coordinates with highdicom's transformer (PS3.3 C.37.1.2, C.8.12.2.1). We chose
3D over 2D because dciodvfy (dicom3tools 1.00~20220618) reports an error on
every 2D annotation group, even on highdicom's own 2D test file. Per class
with at least one cell there is one POLYGON group of the outlines and, unless
switched off, one POINT group of the centres (a viewer shows points where
outlines are too small to see). Each group carries, per annotation, the
probability of the class, the uncertainty, the anomaly score and the area, and
the class's display colour (Recommended Display CIELab Value), which
dicom-microscopy-viewer (Slim, OHIF) draws the group in.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from analysis.classes import CellClassValues
from analysis.results import CellResult, SlideResult
from dicom_node.encode import codes
from dicom_node.encode.common import (
    EncoderParams,
    algorithm_identification,
    base_level,
    contributing_equipment,
    image_to_slide,
    new_uid,
)
from dicom_node.encode.differential import class_label

#: Display colour per class (sRGB hex), chosen for contrast over a smear: the node's own slide view
#: uses the same table (``viewer.slides.CLASS_COLOURS``), so that a cell has the same colour in
#: every viewer.
CLASS_DISPLAY_COLOURS: dict[CellClassValues, str] = {
    CellClassValues.NEUTROPHIL: "#08306b", CellClassValues.EOSINOPHIL: "#6a2c00",
    CellClassValues.BASOPHIL: "#3f007d", CellClassValues.LYMPHOCYTE: "#00441b",
    CellClassValues.MONOCYTE: "#00404f", CellClassValues.IG: "#000000",
    CellClassValues.ERYTHROBLAST: "#67001f", CellClassValues.PLATELET: "#383838",
}


def display_colour(label: CellClassValues) -> hd.color.CIELabColor:
    """The class's display colour as CIELab (PS3.3 C.10.7.1.1)."""
    hex_rgb = CLASS_DISPLAY_COLOURS[label].lstrip("#")
    red, green, blue = (int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4))
    return hd.color.CIELabColor.from_rgb(red, green, blue)


def encode_bulk_annotations(
    result: SlideResult,
    source_datasets: Sequence[Dataset],
    params: EncoderParams,
    *,
    include_centres: bool = True,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    """Build the bulk annotations of all cells of one analysed slide.

    Parameters
    ----------
    result:
        The analysis result; must hold at least one cell.
    source_datasets:
        The slide's instances (pixel data not needed), including the base level.
    params:
        Equipment and series numbering.
    include_centres:
        Also write one POINT group of cell centres per class.
    series_instance_uid, sop_instance_uid:
        UIDs of the new series and instance; new ones when omitted.

    Returns
    -------
    highdicom.ann.MicroscopyBulkSimpleAnnotations
        In the slide's study and frame of reference, series ``params.ann_series_number``.

    Raises
    ------
    ValueError
        If the result has no cells (an annotation group cannot be empty;
        PS3.3 C.37.1.2: Number of Annotations is at least 1), or the source
        datasets are not the slide of the result.
    """
    source = base_level(result, source_datasets)
    if not result.cells:
        raise ValueError("result has no cells: there is nothing to annotate")
    algorithm = algorithm_identification(result)
    groups: list[hd.ann.AnnotationGroup] = []
    for label in CellClassValues:
        cells = [cell for cell in result.cells if cell.label is label]
        if not cells:
            continue
        outlines = [image_to_slide(source, np.asarray(cell.outline)) for cell in cells]
        groups.append(_group(len(groups) + 1, label, "outlines", hd.ann.GraphicTypeValues.POLYGON,
                             outlines, cells, algorithm))
        if include_centres:
            centres = [image_to_slide(source, np.array([[cell.x, cell.y]])) for cell in cells]
            groups.append(_group(len(groups) + 1, label, "centres", hd.ann.GraphicTypeValues.POINT,
                                 centres, cells, algorithm))
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD3D,
        annotation_groups=groups,
        series_instance_uid=new_uid(series_instance_uid),
        series_number=params.ann_series_number,
        sop_instance_uid=new_uid(sop_instance_uid),
        instance_number=1,
        manufacturer=params.manufacturer,
        manufacturer_model_name=params.manufacturer_model_name,
        software_versions=params.software_versions,
        device_serial_number=params.device_serial_number,
        content_description="White cells by class (preliminary)",
        content_label="WHITE_CELLS",
        pixel_origin_interpretation=hd.ann.PixelOriginInterpretationValues.VOLUME,
        contributing_equipment=contributing_equipment(result, params),
        series_description="White cells by class (preliminary)",
        institution_name=params.institution_name,
        coding_schemes=[codes.CODING_SCHEME],
    )


def _group(number: int, label: CellClassValues, what: str, graphic_type: hd.ann.GraphicTypeValues,
           graphic_data: list[np.ndarray], cells: list[CellResult],
           algorithm: hd.AlgorithmIdentificationSequence) -> hd.ann.AnnotationGroup:
    """One annotation group: the cells of one class as outlines or centres, with measurements."""
    measurements = [
        hd.ann.Measurements(name=codes.PROBABILITY, unit=codes.NO_UNITS,
                            values=np.array([c.probability for c in cells], dtype=np.float32)),
        hd.ann.Measurements(name=codes.UNCERTAINTY, unit=codes.NO_UNITS,
                            values=np.array([c.uncertainty for c in cells], dtype=np.float32)),
        hd.ann.Measurements(name=codes.ANOMALY_SCORE, unit=codes.NO_UNITS,
                            values=np.array([c.anomaly_score for c in cells], dtype=np.float32)),
        hd.ann.Measurements(name=codes.AREA, unit=codes.SQUARE_MICROMETER,
                            values=np.array([c.area_um2 for c in cells], dtype=np.float32)),
    ]
    return hd.ann.AnnotationGroup(
        number=number,
        uid=str(hd.UID()),
        label=f"{class_label(label)} {what}",  # in words: "immature granulocyte outlines"
        annotated_property_category=codes.ANATOMICAL_STRUCTURE,
        annotated_property_type=codes.CLASS_CODES[label],
        graphic_type=graphic_type,
        graphic_data=graphic_data,
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        measurements=measurements,
        description=f"{codes.CLASS_CODES[label].meaning} {what}, cell ids "
                    + " ".join(str(c.cell_id) for c in cells)[:900],
        display_color=display_colour(label),
    )
