"""The preliminary report: a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Content tree (PS3.16 TID 1500):

- Procedure reported: white blood cell differential count on a peripheral blood smear.
- Observation context: the node as device observer (TID 1004), the slide's
  specimen as subject (TID 1009).
- Image library (TID 1600): the source slide's base level.
- One TID 1501 group "All classified cells": number of cells, of white cells (the
  differential's denominator), of cells flagged for review, of those unlike any
  training class and of suspected abnormal cells; under 100 white cells the coded
  note "Fewer than 100 white cells: interpret with caution".
- One TID 1501 group per class (:mod:`dicom_node.encode.differential`): for the six
  white-cell classes the count, the percentage of white cells and the lower and upper
  limit of its 95 % Wilson score confidence interval (see
  :class:`analysis.results.ClassCount` for why Wilson), and the note when it applies;
  for erythroblasts (nucleated red cells) the count and the number per 100 white
  cells; for platelets the count and the platelets seen (an estimate).
- One TID 1410 group per cell flagged for review or suspected abnormal: the
  outline as SCOORD3D polygon in the slide's frame of reference, the class as
  finding type, probability, uncertainty, anomaly score and area, and the
  reasons as coded qualitative evaluations.

Every group carries the algorithm identification (TID 4019). The document is
COMPLETE (every cell was analysed), PRELIMINARY and UNVERIFIED (PS3.3 C.17.2);
the verified report follows sign-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from analysis.classes import CellClassValues
from analysis.results import CellResult, ClassCount, FlagReasonValues, SlideResult
from dicom_node.encode import codes
from dicom_node.encode.common import (
    EncoderParams,
    algorithm_parameters,
    base_level,
    cell_tracking_uid,
    contributing_equipment,
    image_to_slide,
    new_uid,
)
from dicom_node.encode.differential import Differential, class_label

_REASON_CODES = {
    FlagReasonValues.HIGH_UNCERTAINTY: codes.HIGH_UNCERTAINTY,
    FlagReasonValues.HIGH_ANOMALY_SCORE: codes.HIGH_ANOMALY,
    FlagReasonValues.SIGNIFICANT_CLASS: codes.SIGNIFICANT_CLASS,
    FlagReasonValues.MODELS_DISAGREE: codes.MODELS_DISAGREE,
    FlagReasonValues.OUTSIDE_DOMAIN: codes.OUTSIDE_DOMAIN,
}


def encode_report(
    result: SlideResult,
    source_datasets: Sequence[Dataset],
    params: EncoderParams,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    platelets_detected: int | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the preliminary TID 1500 measurement report of one analysed slide.

    Parameters
    ----------
    result:
        The analysis result.
    source_datasets:
        The slide's instances (pixel data not needed); must include the base level
        named by ``result.sop_instance_uids``.
    params:
        Equipment and series numbering.
    series_instance_uid, sop_instance_uid:
        UIDs of the new series and instance; new ones when omitted.
    platelets_detected:
        Platelets the cell finder counted without classifying them (part of the platelet
        estimate); ``None`` when not known.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        In the slide's study, a new series ``params.sr_series_number``.

    Raises
    ------
    ValueError
        If the source datasets are not the slide of the result.
    """
    source = base_level(result, source_datasets)
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.provenance.name,
        version=result.provenance.version,
        parameters=[f"{key}={value}" for key, value in algorithm_parameters(result).items()],
    )
    source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]
    diff = Differential.from_result(result, platelets_detected=platelets_detected)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier="All classified cells"),
            finding_type=codes.CELL,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=codes.CELL_COUNT, value=len(result.cells), unit=codes.CELLS),
                hd.sr.Measurement(name=codes.WHITE_CELL_COUNT, value=diff.white_cell_count,
                                  unit=codes.CELLS),
                hd.sr.Measurement(name=codes.REVIEW_COUNT, value=diff.flagged, unit=codes.CELLS),
                hd.sr.Measurement(name=codes.UNLIKE_COUNT, value=diff.unlike_training,
                                  unit=codes.CELLS),
                hd.sr.Measurement(name=codes.ABNORMAL_COUNT, value=len(result.abnormal_cells),
                                  unit=codes.CELLS),
            ],
            qualitative_evaluations=differential_note(diff) + domain_evaluation(result),
            source_images=source_images,
        )
    ]
    groups.extend(differential_groups(diff, algorithm, source_images))
    flagged = [cell for cell in result.cells if cell.review or cell.abnormal]
    groups.extend(_cell_group(result, source, cell, algorithm) for cell in flagged)

    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=params.device_observer_uid,
                name=params.manufacturer_model_name,
                manufacturer_name=params.manufacturer,
                model_name=params.manufacturer_model_name,
                serial_number=params.device_serial_number,
            ),
        ),
        subject_context=_specimen_context(source),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.PROCEDURE_DIFFERENTIAL,
        imaging_measurements=groups,
        referenced_images=[source],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(source_datasets),
        content=report,
        series_instance_uid=new_uid(series_instance_uid),
        series_number=params.sr_series_number,
        sop_instance_uid=new_uid(sop_instance_uid),
        instance_number=1,
        manufacturer=params.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=params.institution_name,
        performed_procedure_codes=[codes.PROCEDURE_DIFFERENTIAL],
        contributing_equipment=contributing_equipment(result, params),
        series_description="White-cell differential (preliminary, unverified)",
        manufacturer_model_name=params.manufacturer_model_name,
        software_versions=params.software_versions,
        device_serial_number=params.device_serial_number,
        coding_schemes=[codes.CODING_SCHEME],
    )


def _specimen_context(source: Dataset) -> hd.sr.SubjectContext | None:
    """Subject context from the slide's first specimen (TID 1009), if it describes one."""
    specimens = source.get("SpecimenDescriptionSequence")
    if not specimens:
        return None
    specimen = specimens[0]
    specimen_type = None
    if specimen.get("SpecimenTypeCodeSequence"):
        specimen_type = hd.sr.CodedConcept.from_dataset(specimen.SpecimenTypeCodeSequence[0])
    return hd.sr.SubjectContext(
        subject_class=codes.SPECIMEN,
        subject_class_specific_context=hd.sr.SubjectContextSpecimen(
            uid=specimen.SpecimenUID,
            identifier=specimen.get("SpecimenIdentifier") or None,
            container_identifier=source.get("ContainerIdentifier") or None,
            specimen_type=specimen_type,
        ),
    )


def domain_evaluation(result: SlideResult) -> list[hd.sr.QualitativeEvaluation]:
    """The slide quality check (:mod:`analysis.domain`) as a coded evaluation; its reasons in
    words are in the algorithm's parameters (``validated_domain``)."""
    verdict = str(result.provenance.parameters.get("validated_domain", ""))
    if not verdict:
        return []
    value = codes.OUTSIDE_DOMAIN if verdict.startswith("outside") else codes.INSIDE_DOMAIN
    return [hd.sr.QualitativeEvaluation(name=codes.SLIDE_QUALITY, value=value)]


def differential_note(diff: Differential) -> list[hd.sr.QualitativeEvaluation]:
    """The coded caution of a differential on fewer than 100 white cells (none otherwise)."""
    if not diff.few_white_cells:
        return []
    return [hd.sr.QualitativeEvaluation(name=codes.DIFFERENTIAL_NOTE, value=codes.FEW_WHITE_CELLS)]


def differential_groups(diff: Differential, algorithm: hd.sr.AlgorithmIdentification | None,
                        source_images: list[hd.sr.SourceImageForMeasurementGroup],
                        ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per class, in class order: the six white-cell classes with their
    percentage of white cells (and the note under 100 white cells), erythroblasts per 100 white
    cells, platelets with the platelets seen (an estimate)."""
    note = differential_note(diff)
    groups = [_class_group(count, algorithm, source_images, note) for count in diff.white_cells]
    per_100 = diff.nrbc_per_100_wbc
    nrbc = [hd.sr.Measurement(name=codes.CELL_COUNT, value=diff.nucleated_red_cells, unit=codes.CELLS)]
    if per_100 is not None:
        nrbc.append(hd.sr.Measurement(name=codes.NRBC_PER_100_WBC, value=per_100, unit=codes.PER_100_WBC))
    groups.append(_group(CellClassValues.ERYTHROBLAST, algorithm, source_images, nrbc))
    groups.append(_group(CellClassValues.PLATELET, algorithm, source_images, [
        hd.sr.Measurement(name=codes.CELL_COUNT, value=diff.platelets_classified, unit=codes.CELLS),
        hd.sr.Measurement(name=codes.PLATELETS_SEEN, value=diff.platelets, unit=codes.CELLS),
    ]))
    return groups


def _group(label: CellClassValues, algorithm: hd.sr.AlgorithmIdentification | None,
           source_images: list[hd.sr.SourceImageForMeasurementGroup],
           measurements: list[hd.sr.Measurement],
           qualitative_evaluations: list[hd.sr.QualitativeEvaluation] | None = None,
           ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"Differential: {class_label(label)}"),
        finding_type=codes.CLASS_CODES[label],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=qualitative_evaluations or None,
        source_images=source_images,
    )


def _class_group(count: ClassCount, algorithm: hd.sr.AlgorithmIdentification | None,
                 source_images: list[hd.sr.SourceImageForMeasurementGroup],
                 note: list[hd.sr.QualitativeEvaluation] | None = None,
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of one white-cell class: count, percentage of white cells, its 95 % Wilson
    interval."""
    measurements = [hd.sr.Measurement(name=codes.CELL_COUNT, value=count.count, unit=codes.CELLS)]
    percentage, interval = count.percentage, count.confidence_interval
    if percentage is not None and interval is not None:
        lower, upper = interval
        measurements += [
            # Not TID 310's upper/lower measurement uncertainty: highdicom writes those with
            # unit "1", which would misstate a range in percent. Explicit limits instead.
            hd.sr.Measurement(name=codes.WHITE_CELL_PERCENTAGE, value=percentage, unit=codes.PERCENT),
            hd.sr.Measurement(name=codes.CI95_LOWER, value=lower, unit=codes.PERCENT),
            hd.sr.Measurement(name=codes.CI95_UPPER, value=upper, unit=codes.PERCENT),
        ]
    return _group(count.label, algorithm, source_images, measurements, note)


def _cell_group(result: SlideResult, source: Dataset, cell: CellResult,
                algorithm: hd.sr.AlgorithmIdentification,
                ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one flagged cell, its outline in slide coordinates (SCOORD3D)."""
    outline = np.asarray(cell.outline + (cell.outline[0],), dtype=np.float64)  # closed (PS3.3 C.18.9.1.2)
    evaluations = []
    for reason in cell.review_reasons:  # one evaluation per reason that applies
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=codes.REVIEW_REASON, value=_REASON_CODES[reason]))
    if cell.abnormal_reason is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=codes.ABNORMAL_REASON, value=_REASON_CODES[cell.abnormal_reason]))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=cell_tracking_uid(cell.cell_id, series_instance_uid=result.series_instance_uid,
                                  sop_instance_uids=result.sop_instance_uids,
                                  weights_sha256=result.provenance.weights_sha256),
            identifier=f"Cell {cell.cell_id}"),
        referenced_region=hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
            graphic_data=image_to_slide(source, outline),
            frame_of_reference_uid=result.frame_of_reference_uid,
        ),
        finding_type=codes.CLASS_CODES[cell.label],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=codes.PROBABILITY, value=cell.probability, unit=codes.NO_UNITS),
            hd.sr.Measurement(name=codes.UNCERTAINTY, value=cell.uncertainty, unit=codes.NO_UNITS),
            hd.sr.Measurement(name=codes.ANOMALY_SCORE, value=cell.anomaly_score, unit=codes.NO_UNITS),
            hd.sr.Measurement(name=codes.AREA, value=cell.area_um2, unit=codes.SQUARE_MICROMETER),
        ],
        qualitative_evaluations=evaluations,
    )
