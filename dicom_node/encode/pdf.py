"""The report any PACS shows: the differential as an Encapsulated PDF (PS3.3 A.45.1).

Many PACS viewers cannot render a Comprehensive 3D SR; every one of them shows a PDF. Next to the
SR the node writes one PDF report per slide, in the slide's study:

- the preliminary report (series :data:`PDF_SERIES_NUMBER`), made with the SR from the
  :class:`analysis.results.SlideResult`: PRELIMINARY, UNVERIFIED;
- the final report (series :data:`FINAL_PDF_SERIES_NUMBER`, one instance per signed version),
  made at sign-off from the reviewed cells: FINAL, VERIFIED, with the reviewer.

Each page set holds the patient and study identity at the top, the differential with its 95 %
Wilson intervals, the flagged cells with their reasons, and the model's provenance. The PDF is
drawn with fpdf2 (DejaVu Sans from matplotlib's data, so any character of a patient name prints).
highdicom 0.28 has no Encapsulated PDF class: the dataset is built with pydicom, with the patient,
study and equipment attributes the SR encoder writes (:mod:`dicom_node.encode.common`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from analysis.results import CellResult, SlideResult
from dicom_node.encode.common import VL_WSM, EncoderParams, base_level, new_uid
from dicom_node.encode.differential import (
    Differential,
    cell_reason_labels,
    class_label,
    reason_labels,
    result_reason_labels,
)

# fpdf2 subsets the font with fontTools, which logs a dozen INFO lines per PDF.
logging.getLogger("fontTools").setLevel(logging.WARNING)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: Series Number of the preliminary PDF report (SR 900, ANN 901, SEG 902, final SR 903).
PDF_SERIES_NUMBER = 904
#: Series Number of the final (verified) PDF reports, one instance per signed version.
FINAL_PDF_SERIES_NUMBER = 906

# The patient and study attributes copied from the slide (Patient, General Study modules).
_PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                  "PatientIdentityRemoved", "DeidentificationMethod",
                  "DeidentificationMethodCodeSequence", "StudyInstanceUID", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber",
                  "IssuerOfAccessionNumberSequence", "StudyDescription")
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclasses.dataclass(frozen=True)
class FlaggedCellRow:
    """One flagged cell of the report.

    ``original_label`` is the algorithm's class when the report is the reviewed one (``label`` is
    then the reviewer's class, or ``"unclassifiable"``); ``None`` in the preliminary report.
    """

    cell_id: int
    label: str
    probability: float | None
    reasons: tuple[str, ...]
    original_label: str | None = None


@dataclasses.dataclass(frozen=True)
class Verification:
    """Who verified the final report, and what the review changed."""

    observer_name: str
    organization: str
    verified_at: datetime.datetime
    version: int = 1
    changed_cells: int = 0
    #: Flagged cells nobody looked at, signed with the signer's explicit confirmation.
    unreviewed_flagged: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReportContent:
    """What one PDF report says, as plain values (no DICOM, no drawing).

    Built by :func:`content_from_result` (preliminary) or :func:`content_from_review` (final);
    the numbers come from :class:`dicom_node.encode.differential.Differential`, as in the SR.
    """

    differential: Differential
    abnormal_cells: int
    flagged: tuple[FlaggedCellRow, ...]
    model_name: str
    model_version: str
    weights_sha256: str
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    verification: Verification | None = None

    @property
    def final(self) -> bool:
        return self.verification is not None


# --- What the report says ------------------------------------------------------------------
def class_name(label: str) -> str:
    """The class in words, capitalised for a table: ``"ig"`` -> ``"Immature granulocyte"``."""
    text = class_label(label)
    return text[:1].upper() + text[1:]


def _cell_reasons(cell: CellResult) -> tuple[str, ...]:
    reasons = (["suspected abnormal"] if cell.abnormal else []) + result_reason_labels(cell)
    if cell.abnormal_reason is not None:
        reasons += reason_labels([cell.abnormal_reason])
    return tuple(dict.fromkeys(reasons))


def content_from_result(result: SlideResult, *, platelets_detected: int | None = None) -> ReportContent:
    """The preliminary report's content: the algorithm's differential and flagged cells."""
    flagged = tuple(FlaggedCellRow(c.cell_id, class_name(c.label.value), c.probability, _cell_reasons(c))
                    for c in result.cells if c.review or c.abnormal)
    provenance = result.provenance
    return ReportContent(
        differential=Differential.from_result(result, platelets_detected=platelets_detected),
        abnormal_cells=len(result.abnormal_cells), flagged=flagged,
        model_name=provenance.name, model_version=provenance.version,
        weights_sha256=provenance.weights_sha256, parameters=dict(provenance.parameters))


def content_from_review(summary: Mapping[str, Any], cells: Sequence[Mapping[str, Any]],
                        verification: Verification) -> ReportContent:
    """The final report's content from the analysis summary (``summary.json``, written by
    :mod:`dicom_node.jobs.result`) and the reviewed cells (the summary's cells with ``label``,
    ``original_label``, ``abnormal``, ``original_abnormal``, ``unclassifiable`` and ``changed``
    after review, as the viewer keeps them). Lists the cells the algorithm flagged and the
    cells the reviewer changed."""
    rows = []
    for cell in cells:
        original_abnormal = bool(cell.get("original_abnormal", cell.get("abnormal")))
        if not (cell.get("review") or original_abnormal or cell.get("changed")):
            continue
        reasons = (["suspected abnormal"] if original_abnormal else []) + cell_reason_labels(cell)
        if cell.get("abnormal") and not original_abnormal:
            reasons.append("marked abnormal by the reviewer")
        if cell.get("changed"):
            reasons.append("changed by the reviewer")
        label = "unclassifiable" if cell.get("unclassifiable") else class_name(str(cell["label"]))
        rows.append(FlaggedCellRow(int(cell["cell_id"]), label, cell.get("probability"),
                                   tuple(dict.fromkeys(reasons)),
                                   original_label=class_name(str(cell.get("original_label", cell["label"])))))
    provenance = summary.get("provenance", {})
    return ReportContent(
        differential=Differential.from_cells(cells, platelets_detected=summary.get("platelets_detected")),
        abnormal_cells=sum(1 for c in cells if c.get("abnormal")),
        flagged=tuple(rows), model_name=str(provenance.get("name", "")),
        model_version=str(provenance.get("version", "")),
        weights_sha256=str(provenance.get("weights_sha256", "")),
        parameters=dict(provenance.get("parameters", {})), verification=verification)


# --- Drawing the PDF -------------------------------------------------------------------------
def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _person_name(value: Any) -> str:
    """A PN value as people write it: ``Doe^Jane`` -> ``Doe, Jane``."""
    parts = [p for p in str(value or "").split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in parts[2:] if p)
    return ", ".join(p for p in (family, " ".join(x for x in (given, rest) if x)) if p)


def _date(value: Any) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def _identity_rows(source: Dataset) -> list[tuple[str, str]]:
    specimens = source.get("SpecimenDescriptionSequence") or []
    specimen = str(specimens[0].get("SpecimenIdentifier", "")) if specimens else ""
    return [
        ("Patient", _person_name(source.get("PatientName")) or "(no name)"),
        ("Patient ID", str(source.get("PatientID", "")) or "(none)"),
        ("Birth date / sex", (f"{_date(source.get('PatientBirthDate')) or '-'} / "
                              f"{source.get('PatientSex', '') or '-'}")),
        ("Accession number", str(source.get("AccessionNumber", "")) or "-"),
        ("Study date / ID", f"{_date(source.get('StudyDate')) or '-'} / {source.get('StudyID', '') or '-'}"),
        ("Slide (container) / specimen", f"{source.get('ContainerIdentifier', '') or '-'} / {specimen or '-'}"),
        ("Study Instance UID", str(source.get("StudyInstanceUID", ""))),
    ]


def render_pdf(content: ReportContent, source: Dataset, *, software_versions: str = "cytonode",
               created_at: datetime.datetime | None = None) -> bytes:
    """Draw the report; ``source`` is the slide's image whose patient and study it names."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    created_at = created_at or datetime.datetime.now(datetime.timezone.utc)
    status = ("FINAL, VERIFIED" if content.final else "PRELIMINARY, UNVERIFIED")
    pdf = FPDF(format="A4")
    fonts = _font_dir()
    pdf.add_font("DejaVu", "", fonts / "DejaVuSans.ttf")
    pdf.add_font("DejaVu", "B", fonts / "DejaVuSans-Bold.ttf")
    pdf.set_title(f"White-cell differential ({status.lower()})")
    pdf.set_creator(software_versions)
    pdf.set_creation_date(created_at)
    pdf.set_auto_page_break(True, margin=18)
    pdf.alias_nb_pages()
    footer = f"{software_versions} | {status} | created {created_at:%Y-%m-%d %H:%M} UTC"

    def _footer() -> None:
        pdf.set_y(-14)
        pdf.set_font("DejaVu", "", 7)
        pdf.cell(0, 5, f"{footer} | page {pdf.page_no()}/{{nb}}", align="C")

    pdf.footer = _footer  # type: ignore[method-assign]
    pdf.add_page()
    width = pdf.epw

    def heading(text: str) -> None:
        pdf.ln(3)
        pdf.set_font("DejaVu", "B", 11)
        pdf.cell(width, 7, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font("DejaVu", "", 9)

    def line(text: str) -> None:
        pdf.multi_cell(width, 5, text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    pdf.set_font("DejaVu", "B", 14)
    pdf.cell(width, 8, "White blood cell differential, peripheral blood smear",
             new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("DejaVu", "B", 10)
    pdf.set_text_color(*((0, 90, 0) if content.final else (170, 60, 0)))
    pdf.cell(width, 6, f"Report status: {status}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_text_color(0, 0, 0)
    pdf.set_font("DejaVu", "", 9)
    with pdf.table(col_widths=(45, 135), first_row_as_headings=False, line_height=5.5,
                   borders_layout="HORIZONTAL_LINES") as table:
        for key, value in _identity_rows(source):
            table.row((key, value))

    heading("Verification")
    verification = content.verification
    differential = content.differential
    if verification is None:
        line("Not verified: produced by the algorithm without review. A pathologist's sign-off "
             "issues the final, verified report.")
    else:
        when = f"{verification.verified_at:%Y-%m-%d %H:%M %Z}".strip()
        line(f"Verified by {_person_name(verification.observer_name)} ({verification.organization}) "
             f"on {when}; report version {verification.version}. Cells changed by the reviewer: "
             f"{verification.changed_cells}; marked unclassifiable: {differential.unclassifiable}.")
        if verification.unreviewed_flagged:
            pdf.set_font("DejaVu", "B", 9)
            n = len(verification.unreviewed_flagged)
            line(f"Signed with {n} flagged cell{'s' if n != 1 else ''} not reviewed (confirmed by the "
                 f"signer): {', '.join(f'#{c}' for c in verification.unreviewed_flagged)}.")
            pdf.set_font("DejaVu", "", 9)

    heading("Differential")
    line(f"{differential.white_cell_count} white cells counted. Percentage of the white cells with "
         "its 95 % confidence interval (Wilson score interval).")
    with pdf.table(col_widths=(60, 25, 30, 65), text_align=("LEFT", "RIGHT", "RIGHT", "RIGHT"),
                   line_height=5.5, borders_layout="HORIZONTAL_LINES") as table:
        table.row(("White cell class", "Count", "%", "95 % interval (%)"))
        for count in differential.white_cells:
            interval = count.confidence_interval
            table.row((class_name(count.label.value), str(count.count),
                       "-" if count.percentage is None else f"{count.percentage:.1f}",
                       "-" if interval is None else f"{interval[0]:.1f} - {interval[1]:.1f}"))
    pdf.ln(1)
    if differential.note:
        pdf.set_font("DejaVu", "B", 9)
        line(f"Note: {differential.note}.")
        pdf.set_font("DejaVu", "", 9)
    line(f"Not white cells, not in the percentages: {differential.nrbc_text}; "
         f"{differential.platelet_text}.")

    heading("Flagged cells")
    line(f"{differential.flag_text}; suspected abnormal: {content.abnormal_cells}"
         + ("; listed: the cells the algorithm flagged and the cells the reviewer changed."
            if content.final else "."))
    if content.flagged:
        final = content.final
        head = (("Cell", "Algorithm", "Reviewed", "Reasons") if final
                else ("Cell", "Class", "Probability", "Reasons"))
        with pdf.table(col_widths=(15, 40, 40, 85) if final else (15, 45, 25, 95), line_height=5,
                       borders_layout="HORIZONTAL_LINES") as table:
            table.row(head)
            for cell in content.flagged:
                reasons = "; ".join(cell.reasons) or "-"
                if final:
                    table.row((f"#{cell.cell_id}", cell.original_label or "", cell.label, reasons))
                else:
                    probability = "-" if cell.probability is None else f"{cell.probability:.2f}"
                    table.row((f"#{cell.cell_id}", cell.label, probability, reasons))

    heading("Method and provenance")
    line(f"Model: {content.model_name} version {content.model_version}; weights sha256 "
         f"{content.weights_sha256}. Software: {software_versions}.")
    if content.parameters:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(content.parameters.items()))
        line(f"Parameters: {shown}.")
    line("Research use only; not a medical device. The DICOM SR of this study holds the same "
         "results in coded form.")
    return bytes(pdf.output())


# --- The DICOM object --------------------------------------------------------------------------
def slide_image(source_datasets: Sequence[Dataset]) -> Dataset:
    """The slide's base level: the VL Whole Slide Microscopy image with the largest matrix."""
    images = [ds for ds in source_datasets
              if ds.get("SOPClassUID") == VL_WSM and "TotalPixelMatrixColumns" in ds]
    if not images:
        raise ValueError("source_datasets hold no VL Whole Slide Microscopy image")
    return max(images, key=lambda ds: int(ds.TotalPixelMatrixColumns))


def final_pdf_series_uid(slide_series_instance_uid: str) -> str:
    """One series for all final PDF versions of a slide, derived from the slide's series."""
    return str(generate_uid(entropy_srcs=[slide_series_instance_uid, "final pdf report"]))


def encode_pdf(
    pdf_bytes: bytes,
    source: Dataset,
    params: EncoderParams,
    *,
    document_title: str,
    series_instance_uid: str | None,
    series_number: int,
    series_description: str,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    source_instances: Sequence[Dataset] = (),
    created_at: datetime.datetime | None = None,
) -> Dataset:
    """An Encapsulated PDF instance (PS3.3 A.45.1) in the study of ``source``.

    ``source_instances`` are the instances the document was derived from (Source Instance
    Sequence, PS3.3 C.24.2); a new series when ``series_instance_uid`` is ``None``. Raises
    ``ValueError`` if ``pdf_bytes`` is not a PDF.
    """
    if not pdf_bytes.startswith(b"%PDF-"):
        raise ValueError("pdf_bytes is not a PDF document")
    created_at = (created_at or datetime.datetime.now(datetime.timezone.utc)).astimezone()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = new_uid(sop_instance_uid)
    ds.InstanceCreationDate = created_at.strftime("%Y%m%d")
    ds.InstanceCreationTime = created_at.strftime("%H%M%S")
    for keyword in _PATIENT_STUDY:  # Patient, General Study
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in _TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.Modality = "DOC"  # Encapsulated Document Series
    ds.SeriesInstanceUID = new_uid(series_instance_uid)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = params.manufacturer  # General Equipment
    if params.institution_name:
        ds.InstitutionName = params.institution_name
    ds.ManufacturerModelName = params.manufacturer_model_name
    ds.DeviceSerialNumber = params.device_serial_number
    ds.SoftwareVersions = params.software_versions
    ds.ConversionType = "WSD"  # SC Equipment: made on a workstation
    ds.SecondaryCaptureDeviceManufacturer = params.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = params.manufacturer_model_name
    ds.SecondaryCaptureDeviceSoftwareVersions = params.software_versions
    ds.InstanceNumber = instance_number  # Encapsulated Document
    ds.ContentDate = created_at.strftime("%Y%m%d")
    ds.ContentTime = created_at.strftime("%H%M%S")
    ds.AcquisitionDateTime = created_at.strftime("%Y%m%d%H%M%S%z")
    ds.BurnedInAnnotation = "YES"  # the report names the patient
    references = []
    for instance in source_instances:
        item = Dataset()
        item.ReferencedSOPClassUID = instance.SOPClassUID
        item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
        references.append(item)
    if references:
        ds.SourceInstanceSequence = references
    ds.DocumentTitle = document_title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf_bytes + (b"\x00" if len(pdf_bytes) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def encode_pdf_report(result: SlideResult, source_datasets: Sequence[Dataset], params: EncoderParams,
                      *, platelets_detected: int | None = None, series_instance_uid: str | None = None,
                      sop_instance_uid: str | None = None) -> Dataset:
    """The preliminary PDF report of one analysed slide (series :data:`PDF_SERIES_NUMBER`);
    ``platelets_detected`` as for the SR (platelets the cell finder counted unclassified)."""
    source = base_level(result, source_datasets)
    content = content_from_result(result, platelets_detected=platelets_detected)
    pdf_bytes = render_pdf(content, source, software_versions=params.software_versions)
    return encode_pdf(
        pdf_bytes, source, params, document_title="White-cell differential (preliminary, unverified)",
        series_instance_uid=series_instance_uid, series_number=PDF_SERIES_NUMBER,
        series_description="White-cell differential report, PDF (preliminary, unverified)",
        sop_instance_uid=sop_instance_uid, source_instances=[source])


def encode_final_pdf_report(summary: Mapping[str, Any], cells: Sequence[Mapping[str, Any]],
                            source_datasets: Sequence[Dataset], verification: Verification,
                            params: EncoderParams | None = None, *,
                            final_report: Dataset | None = None,
                            sop_instance_uid: str | None = None) -> Dataset:
    """The final PDF report after sign-off (series :data:`FINAL_PDF_SERIES_NUMBER`, instance
    number = the signed version); ``final_report`` is the verified SR it goes with."""
    params = params or EncoderParams()
    source = slide_image(source_datasets)
    content = content_from_review(summary, cells, verification)
    pdf_bytes = render_pdf(content, source, software_versions=params.software_versions)
    return encode_pdf(
        pdf_bytes, source, params, document_title="White-cell differential (final, verified)",
        series_instance_uid=final_pdf_series_uid(str(source.SeriesInstanceUID)),
        series_number=FINAL_PDF_SERIES_NUMBER,
        series_description="White-cell differential report, PDF (final, verified)",
        sop_instance_uid=sop_instance_uid, instance_number=verification.version,
        source_instances=[source, *([final_report] if final_report is not None else [])])
