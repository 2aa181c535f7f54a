"""The DICOM objects of one analysed slide, made from the slide the job opened.

:func:`encode_results` is the worker's encoding step (``cytonode analyze`` calls it too): the
source headers and the gallery's crops come from the open :class:`analysis.tiles.Slide`, so no
file of the slide is read again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis.results import SlideResult
    from analysis.tiles import Slide
    from dicom_node.encode.common import EncoderParams


def encode_results(result: SlideResult, slide: Slide | Sequence[Path], *,
                   platelets_detected: int | None = None,
                   params: EncoderParams | None = None) -> dict[str, Any]:
    """The DICOM objects of one slide's result: ``sr`` always, ``ann`` when there are cells,
    ``seg`` when there are heatmaps (an annotation group cannot be empty, PS3.3 C.37.1.2),
    ``pdf`` always and ``sc`` when cells are flagged (released with the SR: same outbox path).

    Parameters
    ----------
    result:
        The analysis of the slide.
    slide:
        The slide the result was computed from, open (its headers are the source images; it
        stays open), or its files (opened here at the result's pixel spacing, then closed).
    platelets_detected:
        Platelets the detector counted, stated in the reports.
    params:
        Who writes the objects and their series numbers (the node's settings' ``encoder``
        section); ``None``: the defaults.
    """
    from analysis.tiles import Slide

    if not isinstance(slide, Slide):
        with Slide.open(list(slide),
                        default_pixel_spacing_um=1000.0 * result.pixel_spacing_mm[1]) as opened:
            return _encode(result, opened, platelets_detected, params)
    return _encode(result, slide, platelets_detected, params)


def _encode(result: SlideResult, slide: Slide, platelets_detected: int | None,
            params: EncoderParams | None) -> dict[str, Any]:
    from dicom_node.encode.ann import encode_bulk_annotations
    from dicom_node.encode.common import EncoderParams
    from dicom_node.encode.pdf import encode_pdf_report
    from dicom_node.encode.sc import encode_flagged_gallery, read_flagged_crops
    from dicom_node.encode.seg import encode_heatmaps
    from dicom_node.encode.sr import encode_report

    source_datasets = list(slide.headers)
    params = params or EncoderParams()
    objects: dict[str, Any] = {"sr": encode_report(result, source_datasets, params,
                                                   platelets_detected=platelets_detected)}
    if result.cells:
        objects["ann"] = encode_bulk_annotations(result, source_datasets, params)
    if result.heatmaps:
        objects["seg"] = encode_heatmaps(result, source_datasets, params)
    # the report any PACS shows, next to the SR (issue 20)
    objects["pdf"] = encode_pdf_report(result, source_datasets, params,
                                       platelets_detected=platelets_detected)
    crops = read_flagged_crops(result, slide)
    if crops:
        objects["sc"] = encode_flagged_gallery(result, source_datasets, crops, params)
    return objects
