"""The final report: a verified Comprehensive 3D SR (TID 1500) issued when a pathologist signs.

It restates the differential over the reviewed classes and records what the reviewer changed:

- Observation context: the signing person (TID 1003) and the node as device (TID 1004), the
  slide's specimen as subject (TID 1009).
- One TID 1501 group "All reviewed cells": classified cells, white cells, cells changed by the
  reviewer, cells marked unclassifiable and cells marked abnormal, cells flagged for review and
  flagged cells nobody looked at; when there are such cells, the coded statement "Signed with
  flagged cells not reviewed: Yes" (the signer confirmed it); under 100 white cells the note.
- One TID 1501 group per class of the reviewed classes, as in the preliminary report
  (:func:`dicom_node.encode.sr.differential_groups`): white cells with percentage of white cells
  and 95 % Wilson interval, erythroblasts per 100 white cells, platelets seen.
- One TID 1410 group per changed cell: its box as SCOORD3D polygon, the reviewed class as finding
  type (or "unclassifiable"), the algorithm's class and the abnormal mark as qualitative evaluations.

The document is COMPLETE, FINAL and VERIFIED (PS3.3 C.17.2: Verifying Observer Sequence with name,
organisation and time). Its Predecessor Documents Sequence references the preliminary SR and any
earlier final version it amends (PS3.3 C.17.2.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from analysis.classes import CellClassValues
from dicom_node.encode import codes
from dicom_node.encode.common import EncoderParams, image_to_slide, new_uid, pixel_spacing
from dicom_node.encode.differential import Differential
from dicom_node.encode.sr import _specimen_context, differential_groups, differential_note

FINAL_SR_SERIES_NUMBER = 903
PERSON = hd.sr.CodedConcept.from_code(dcm_codes.DCM.Person)  # DCM 121006; CID 270 Observer Type


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=codes.PRIVATE_SCHEME, meaning=meaning)


REVIEWED_COUNT = _private("REVIEWEDCOUNT", "Number of cells reviewed")
CHANGED_COUNT = _private("CHANGEDCOUNT", "Number of cells changed by the reviewer")
UNCLASSIFIABLE_COUNT = _private("UNCLCOUNT", "Number of cells marked unclassifiable")
REVIEWER_ABNORMAL_COUNT = _private("REVABNCOUNT", "Number of cells marked abnormal by the reviewer")
UNCLASSIFIABLE = _private("UNCLASSIFIABLE", "Unclassifiable cell")
ALGORITHM_CLASS = _private("ALGCLASS", "Class assigned by the algorithm")
REVIEWER_ABNORMAL = _private("REVABN", "Marked abnormal by the reviewer")
UNREVIEWED_COUNT = _private("UNREVCOUNT", "Number of flagged cells not reviewed")
SIGNED_UNREVIEWED = _private("SIGNUNREV", "Signed with flagged cells not reviewed")
YES = hd.sr.CodedConcept.from_code(dcm_codes.SCT.Yes)  # SCT 373066001
NO = hd.sr.CodedConcept.from_code(dcm_codes.SCT.No)  # SCT 373067005


@dataclasses.dataclass(frozen=True)
class ReviewedCell:
    """One white cell after review.

    Parameters
    ----------
    cell_id:
        The analysis' cell number.
    bbox:
        ``(x0, y0, x1, y1)`` in pixels of the base level's total pixel matrix.
    original_label, label:
        The algorithm's class and the class after review.
    original_abnormal, abnormal:
        The algorithm's abnormal flag and the flag after review.
    unclassifiable:
        The reviewer marked the cell unclassifiable (it leaves the differential).
    tracking_uid:
        The cell's Tracking UID in the preliminary objects, so both reports name the same cell.
    flagged:
        The analysis flagged the cell for review.
    looked_at:
        A reviewer opened, selected or changed the cell in the review.
    """

    cell_id: int
    bbox: tuple[int, int, int, int]
    original_label: str
    label: str
    original_abnormal: bool = False
    abnormal: bool = False
    unclassifiable: bool = False
    tracking_uid: str | None = None
    flagged: bool = False
    looked_at: bool = False

    def __post_init__(self) -> None:
        CellClassValues(self.original_label)
        CellClassValues(self.label)
        x0, y0, x1, y1 = self.bbox
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"bbox must have x1 > x0 and y1 > y0, not {self.bbox}")

    @property
    def changed(self) -> bool:
        return (self.label != self.original_label or self.abnormal != self.original_abnormal
                or self.unclassifiable)


def final_series_uid(preliminary: Dataset) -> str:
    """One series for all final versions of a slide's report, derived from the preliminary SR."""
    return str(generate_uid(entropy_srcs=[str(preliminary.SeriesInstanceUID), "final report"]))


def _source_image(source_datasets: Sequence[Dataset], preliminary: Dataset) -> Dataset:
    """The base-level image the preliminary report's regions refer to."""
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for study in preliminary.get("CurrentRequestedProcedureEvidenceSequence", [])
                  for series in study.ReferencedSeriesSequence
                  for item in series.ReferencedSOPSequence}
    candidates = [ds for ds in source_datasets if "TotalPixelMatrixColumns" in ds
                  and (not referenced or str(ds.SOPInstanceUID) in referenced)]
    if not candidates:
        raise ValueError("source_datasets hold no tiled image of the preliminary report")
    return max(candidates, key=lambda ds: int(ds.TotalPixelMatrixColumns))


def encode_final_report(
    preliminary: Dataset,
    source_datasets: Sequence[Dataset],
    cells: Sequence[ReviewedCell],
    *,
    verifying_observer_name: str,
    verifying_organization: str,
    version: int = 1,
    previous_finals: Sequence[Dataset] = (),
    params: EncoderParams | None = None,
    sop_instance_uid: str | None = None,
    platelets_detected: int | None = None,
    confirmed_unreviewed: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """Build the verified final report of a reviewed slide.

    Parameters
    ----------
    preliminary:
        The stored preliminary SR (its predecessor).
    source_datasets:
        The slide's instances (pixel data not needed).
    cells:
        Every white cell after review.
    verifying_observer_name, verifying_organization:
        Who signed (a person name) and for which organisation.
    version:
        1 for the first signature, 2 and up for amendments (becomes the Instance Number).
    previous_finals:
        Earlier final versions this one amends.
    platelets_detected:
        Platelets the cell finder counted without classifying them (part of the estimate).
    confirmed_unreviewed:
        The signer confirmed signing with flagged cells nobody looked at; needed when there are
        such cells, and recorded in the report.

    Raises
    ------
    ValueError
        If the preliminary report is not a preliminary SR of the slide, a name is empty,
        ``version`` is not positive, or flagged cells were not looked at and the signer did not
        confirm it.
    """
    params = params or EncoderParams()
    if not verifying_observer_name.strip() or not verifying_organization.strip():
        raise ValueError("verifying_observer_name and verifying_organization must not be empty")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive int, not {version!r}")
    if preliminary.get("PreliminaryFlag") != "PRELIMINARY":
        raise ValueError("preliminary must be the preliminary SR (PreliminaryFlag PRELIMINARY)")
    source = _source_image(source_datasets, preliminary)
    if source.StudyInstanceUID != preliminary.StudyInstanceUID:
        raise ValueError("the preliminary SR and the slide belong to different studies")
    source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]

    classified = [c for c in cells if not c.unclassifiable]
    changed = [c for c in cells if c.changed]
    unreviewed = sum(1 for c in cells if c.flagged and not c.looked_at)
    if unreviewed and not confirmed_unreviewed:
        raise ValueError(f"{unreviewed} flagged cells were not reviewed: signing needs the signer's "
                         "confirmation (confirmed_unreviewed=True)")
    diff = Differential.from_cells(
        [{"label": c.label, "review": c.flagged, "unclassifiable": c.unclassifiable} for c in cells],
        platelets_detected=platelets_detected)
    statements = list(differential_note(diff))
    if unreviewed:
        statements.append(hd.sr.QualitativeEvaluation(name=SIGNED_UNREVIEWED, value=YES))
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier="All reviewed cells"),
            finding_type=codes.CELL,
            measurements=[
                hd.sr.Measurement(name=REVIEWED_COUNT, value=len(cells), unit=codes.CELLS),
                hd.sr.Measurement(name=codes.CELL_COUNT, value=len(classified), unit=codes.CELLS),
                hd.sr.Measurement(name=CHANGED_COUNT, value=len(changed), unit=codes.CELLS),
                hd.sr.Measurement(name=UNCLASSIFIABLE_COUNT,
                                  value=sum(1 for c in cells if c.unclassifiable), unit=codes.CELLS),
                hd.sr.Measurement(name=REVIEWER_ABNORMAL_COUNT,
                                  value=sum(1 for c in cells if c.abnormal), unit=codes.CELLS),
                hd.sr.Measurement(name=codes.WHITE_CELL_COUNT, value=diff.white_cell_count,
                                  unit=codes.CELLS),
                hd.sr.Measurement(name=codes.REVIEW_COUNT, value=diff.flagged, unit=codes.CELLS),
                hd.sr.Measurement(name=UNREVIEWED_COUNT, value=unreviewed, unit=codes.CELLS),
            ],
            qualitative_evaluations=statements or None,
            source_images=source_images,
        )
    ]
    groups.extend(differential_groups(diff, None, source_images))
    frame_of_reference_uid = str(source.FrameOfReferenceUID)
    pixel_spacing(source)  # a tiled image with pixel measures, or it raises
    groups.extend(_changed_group(source, frame_of_reference_uid, cell) for cell in changed)

    person = hd.sr.ObserverContext(
        observer_type=PERSON,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=verifying_observer_name, organization_name=verifying_organization))
    device = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=params.device_observer_uid, name=params.manufacturer_model_name,
            manufacturer_name=params.manufacturer, model_name=params.manufacturer_model_name,
            serial_number=params.device_serial_number))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=person, observer_device_context=device,
            subject_context=_specimen_context(source)),
        procedure_reported=codes.PROCEDURE_DIFFERENTIAL,
        imaging_measurements=groups,
        referenced_images=[source],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets],
        content=report,
        series_instance_uid=final_series_uid(preliminary),
        series_number=FINAL_SR_SERIES_NUMBER,
        sop_instance_uid=new_uid(sop_instance_uid),
        instance_number=version,
        manufacturer=params.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=verifying_observer_name,
        verifying_organization=verifying_organization,
        institution_name=params.institution_name,
        performed_procedure_codes=[codes.PROCEDURE_DIFFERENTIAL],
        previous_versions=[preliminary, *previous_finals],
        series_description="White-cell differential (final, verified)",
        manufacturer_model_name=params.manufacturer_model_name,
        software_versions=params.software_versions,
        device_serial_number=params.device_serial_number,
        coding_schemes=[codes.CODING_SCHEME],
    )


def _changed_group(source: Dataset, frame_of_reference_uid: str, cell: ReviewedCell,
                   ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one cell the reviewer changed: its box, the new and the old class."""
    x0, y0, x1, y1 = cell.bbox
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    finding = UNCLASSIFIABLE if cell.unclassifiable else codes.CLASS_CODES[CellClassValues(cell.label)]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=cell.tracking_uid or str(hd.UID()), identifier=f"Cell {cell.cell_id}"),
        referenced_region=hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
            graphic_data=image_to_slide(source, outline),
            frame_of_reference_uid=frame_of_reference_uid,
        ),
        finding_type=finding,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=ALGORITHM_CLASS,
                value=codes.CLASS_CODES[CellClassValues(cell.original_label)]),
            hd.sr.QualitativeEvaluation(name=REVIEWER_ABNORMAL, value=YES if cell.abnormal else NO),
        ],
    )
