"""Heatmaps as a FRACTIONAL Segmentation on a coarse grid aligned with the slide.

One segment per heatmap kind in the result: the counterfactual evidence
(segmented property type DCM "Saliency") and the anomaly map (private code).
The segmentation has its own, coarser pixel spacing (``cell_size_px`` times the
base level's), the base level's orientation, and its total pixel matrix starts
at the base level's top left corner, so it lies on the slide in its frame of
reference. It is tiled with the source slide's tile size and writes every tile,
empty or not. Its dimension organisation is TILED_SPARSE (per-frame plane
positions) rather than the source's TILED_FULL: the dciodvfy we validate with
(dicom3tools 1.00~20220618) predates TILED_FULL segmentations and reports five
errors on them, highdicom's own ``seg_image_sm_dots_tiled_full.dcm`` included.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from analysis.results import HeatmapKindValues, SlideResult
from dicom_node.encode import codes
from dicom_node.encode.common import (
    EncoderParams,
    algorithm_identification,
    base_level,
    contributing_equipment,
    image_to_slide,
    new_uid,
    pixel_spacing,
)

_SEGMENT_CODES: dict[HeatmapKindValues, tuple[Code | CodedConcept, Code | CodedConcept, str]] = {
    HeatmapKindValues.COUNTERFACTUAL_EVIDENCE: (codes.SPATIAL_AND_RELATIONAL, codes.SALIENCY,
                                                "Counterfactual evidence"),
    HeatmapKindValues.ANOMALY: (codes.MORPHOLOGICALLY_ABNORMAL, codes.ANOMALY_MAP, "Anomaly"),
}


def encode_heatmaps(
    result: SlideResult,
    source_datasets: Sequence[Dataset],
    params: EncoderParams,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build the FRACTIONAL segmentation of the result's heatmaps.

    Parameters
    ----------
    result:
        The analysis result; must hold at least one heatmap.
    source_datasets:
        The slide's instances, including the base level (pixel data not needed).
    params:
        Equipment and series numbering.
    series_instance_uid, sop_instance_uid:
        UIDs of the new series and instance; new ones when omitted.

    Returns
    -------
    highdicom.seg.Segmentation
        FRACTIONAL (PROBABILITY, 8 bits), one segment per heatmap, in the slide's
        study and frame of reference, series ``params.seg_series_number``.

    Raises
    ------
    ValueError
        If the result has no heatmaps or the source datasets are not its slide.
    """
    source = base_level(result, source_datasets)
    if not result.heatmaps:
        raise ValueError("result has no heatmaps: there is nothing to segment")
    grids = sorted(result.heatmaps, key=lambda g: list(HeatmapKindValues).index(g.kind))
    size = grids[0].cell_size_px
    algorithm = algorithm_identification(result)
    descriptions = []
    for number, grid in enumerate(grids, start=1):
        category, property_type, label = _SEGMENT_CODES[grid.kind]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))
    # (1 frame, rows, columns, segments): the total pixel matrix, tiled by highdicom.
    pixel_array = np.stack([grid.values for grid in grids], axis=-1)[np.newaxis]
    row_spacing, column_spacing = pixel_spacing(source)
    measures = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = measures.get("SliceThickness")
    # Centre of grid pixel (0, 0) is at image coordinate (size / 2, size / 2) of the base level.
    origin = image_to_slide(source, np.array([[size / 2.0, size / 2.0]]))[0]
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=new_uid(series_instance_uid),
        series_number=params.seg_series_number,
        sop_instance_uid=new_uid(sop_instance_uid),
        instance_number=1,
        manufacturer=params.manufacturer,
        manufacturer_model_name=params.manufacturer_model_name,
        software_versions=params.software_versions,
        device_serial_number=params.device_serial_number,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_description="Heatmaps: counterfactual evidence and anomaly (preliminary)",
        content_label="HEATMAPS",
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(row_spacing * size, column_spacing * size),
            slice_thickness=float(thickness) if thickness is not None else None,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="SLIDE", image_orientation=[float(v) for v in source.ImageOrientationSlide]),
        plane_positions=[hd.PlanePositionSequence(
            coordinate_system="SLIDE", image_position=[float(v) for v in origin],
            pixel_matrix_position=(1, 1))],
        omit_empty_frames=False,
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        tile_pixel_array=True,
        tile_size=(int(source.Rows), int(source.Columns)),
        contributing_equipment=contributing_equipment(result, params),
        series_description="Heatmaps (preliminary)",
        institution_name=params.institution_name,
        coding_schemes=[codes.CODING_SCHEME],
    )
