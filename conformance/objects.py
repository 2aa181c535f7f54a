"""Real test objects for the kit: one per (storage SOP class, transfer syntax) pair.

Every object is built from the real sample slide that ships with CytoNode (BCCD blood smear
fields, MIT licence; see ``dicom_node/data/sample_slide/README.md``): its smallest pyramid level
for the image classes, highdicom for SEG, label map SEG, parametric map, bulk annotations and SR,
pydicom and fpdf2 for the Encapsulated PDF.
Pixel data are encoded for the transfer syntax with real codecs (imagecodecs, pydicom), one
fragment per frame; objects without pixel data are encoded as the syntax prescribes (PS3.5
A.4: explicit VR little endian outside Pixel Data). All objects share one study per kit run,
patient ``CYTONODE-KIT``, and are marked as test data (their ImageType is never VOLUME, so the
node does not analyse them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import imagecodecs
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "dicom_node" / "data" / "sample_slide"
KIT_PATIENT_ID = "CYTONODE-KIT"
KIT_PATIENT_NAME = "Conformance^Kit"
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}


def sample_slide_files() -> list[Path]:
    return sorted(SAMPLE_SLIDE.glob("*.dcm"))


def smallest_level() -> Dataset:
    """The sample slide's smallest level, decoded to native RGB (explicit VR little endian)."""
    src = min((dcmread(p) for p in sample_slide_files()), key=lambda d: int(d.TotalPixelMatrixRows))
    src.decompress()
    return src


# Pixel encoders ----------------------------------------------------------------------------
def _progression_order(codestream: bytes) -> int:
    """Progression order of a JPEG 2000 codestream's COD marker (2 = RPCL), PS3.5 A.4.4."""
    pos = codestream.find(b"\xff\x52")
    return codestream[pos + 5]


def _frames(ds: Dataset) -> list[np.ndarray]:
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return [arr] if frames == 1 else list(arr)


def _encode_frames(ds: Dataset, syntax: str) -> tuple[list[bytes], str]:
    """Encoded frames and the Photometric Interpretation they carry."""
    rgb = int(ds.SamplesPerPixel) == 3
    pi = str(ds.PhotometricInterpretation)
    frames = _frames(ds)
    out: list[bytes] = []
    for f in frames:
        if syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"):
            # baseline process 1 (an 8-bit stream is valid in the extended syntax too)
            out.append(bytes(imagecodecs.jpeg8_encode(f, level=90, subsampling="422" if rgb else None)))
            pi = "YBR_FULL_422" if rgb else pi
        elif syntax in ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"):
            out.append(bytes(imagecodecs.jpeg8_encode(f, lossless=True, predictor=1)))  # SV1
        elif syntax == "1.2.840.10008.1.2.4.80":
            out.append(bytes(imagecodecs.jpegls_encode(f, level=0)))
        elif syntax == "1.2.840.10008.1.2.4.81":
            out.append(bytes(imagecodecs.jpegls_encode(f, level=2)))
        elif syntax == "1.2.840.10008.1.2.4.90":
            out.append(bytes(imagecodecs.jpeg2k_encode(f, codecformat="j2k", reversible=True, mct=False)))
        elif syntax == "1.2.840.10008.1.2.4.91":
            out.append(bytes(imagecodecs.jpeg2k_encode(f, level=40, codecformat="j2k", reversible=False,
                                                 mct=False)))
        elif syntax in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202"):
            stream = bytes(imagecodecs.htj2k_encode(f, reversible=True, rgb=False))
            if syntax.endswith(".202") and _progression_order(stream) != 2:
                raise RuntimeError("the HTJ2K encoder did not write RPCL progression")
            out.append(stream)
        elif syntax == "1.2.840.10008.1.2.4.203":
            out.append(bytes(imagecodecs.htj2k_encode(f, level=40, reversible=False, rgb=False)))
        else:
            raise ValueError(f"no encoder for transfer syntax {syntax}")
    return out, pi


def encode_as(ds: Dataset, syntax: str) -> Dataset:
    """A copy of ``ds`` (native pixel data, if any) encoded in ``syntax``, with fresh UIDs kept."""
    ds = copy.deepcopy(ds)
    if "PixelData" not in ds or syntax in UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return ds
    if syntax == "1.2.840.10008.1.2.5":
        ds.compress(syntax, encoding_plugin="pydicom")
        return ds
    frames, pi = _encode_frames(ds, syntax)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = pi
    if syntax not in ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                      "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                      "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202"):
        ds.LossyImageCompression = "01"
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0
    return ds


# Base objects (explicit VR little endian, native pixels) -----------------------------------
def _equipment() -> dict[str, Any]:
    return {"manufacturer": "CytoNode conformance kit", "manufacturer_model_name": "kit",
            "software_versions": "1", "device_serial_number": "1"}


def _identity(ds: Dataset, study_uid: str, series_number: int, sop_class: str) -> Dataset:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.PatientID, ds.PatientName = KIT_PATIENT_ID, KIT_PATIENT_NAME
    ds.StudyID, ds.AccessionNumber = "KIT", ""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    return ds


def _wsm_source(study_uid: str) -> Dataset:
    src = smallest_level()
    src = _identity(src, study_uid, 1, "1.2.840.10008.5.1.4.1.1.77.1.6")
    src.ImageType = ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"]
    src.ContainerIdentifier = "KIT-" + src.SOPInstanceUID[-12:]
    for kw in ("PyramidUID", "ICCProfile"):
        if kw in src:
            delattr(src, kw)
    return src


def _plain_image(src: Dataset, study_uid: str, sop_class: str, frames: int) -> Dataset:
    """A VL microscopic or secondary capture image made of the slide's pixels."""
    ds = Dataset()
    pixels = src.pixel_array
    pixels = pixels if pixels.ndim == 3 else pixels[0]
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = src.StudyDate, src.StudyTime, ""
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.ContentDate, ds.ContentTime = src.StudyDate, src.StudyTime
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = pixels.shape[0], pixels.shape[1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Manufacturer = "CytoNode conformance kit"
    ds.LossyImageCompression = "00"
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.7"):
        ds.Modality, ds.ConversionType = "OT", "WSD"
        ds.ImageType = ["DERIVED", "SECONDARY"]
    else:
        ds.Modality = "SM"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SpecimenDescriptionSequence = []
        ds.ContainerIdentifier = "KIT"
        ds.IssuerOfTheContainerIdentifierSequence = []
        ds.ContainerTypeCodeSequence = []
        ds.AcquisitionDateTime = src.StudyDate + src.StudyTime
        if sop_class.endswith(".77.1.3"):
            item = Dataset()
            item.XOffsetInSlideCoordinateSystem = 0
            item.YOffsetInSlideCoordinateSystem = 0
            ds.ImageCenterPointCoordinatesSequence = [item]
            ds.PixelSpacing = [0.25, 0.25]
    data = np.stack([pixels] * frames) if frames > 1 else pixels
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = None
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds = _identity(ds, study_uid, 2, sop_class)
    return ds


def _seg(src: Dataset, study_uid: str, kind: str) -> Dataset:
    rows, cols = int(src.TotalPixelMatrixRows), int(src.TotalPixelMatrixColumns)
    mask = np.zeros((rows, cols), np.float32)
    mask[rows // 4: rows // 2, cols // 4: cols // 2] = 0.75
    algorithm = hd.AlgorithmIdentificationSequence(
        name="kit", version="1", family=codes.cid7162.ArtificialIntelligence)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="cells", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Cell,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    pixel_array = mask[None] if kind == "FRACTIONAL" else (mask > 0).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[src], pixel_array=pixel_array, segmentation_type=kind,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=3,
        sop_instance_uid=hd.UID(), instance_number=1, tile_pixel_array=True, **_equipment())
    return _as_plain(seg, study_uid)


def _parametric_map(src: Dataset, study_uid: str) -> Dataset:
    rows, cols = int(src.TotalPixelMatrixRows), int(src.TotalPixelMatrixColumns)
    values = (np.arange(rows * cols).reshape(rows, cols) % 200).astype(np.uint8)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="score", lut_explanation="kit score", unit=codes.UCUM.NoUnits,
        value_range=(0, 255), intercept=0, slope=1 / 255)
    pm = hd.pm.ParametricMap(
        source_images=[src], pixel_array=values[None, :, :, None], series_instance_uid=hd.UID(),
        series_number=4, sop_instance_uid=hd.UID(), instance_number=1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[[mapping]],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=128, window_width=256)],
        tile_pixel_array=True, **_equipment())
    return _as_plain(pm, study_uid)


def _annotations(src: Dataset, study_uid: str) -> Dataset:
    points = np.array([[20.0, 20.0], [60.0, 30.0], [100.0, 80.0]])
    group = hd.ann.AnnotationGroup(
        number=1, uid=hd.UID(), label="cells", annotated_property_category=codes.SCT.Tissue,
        annotated_property_type=codes.SCT.Cell,
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        graphic_type=hd.ann.GraphicTypeValues.POINT, graphic_data=[p[None, :] for p in points],
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="kit", version="1", family=codes.cid7162.ArtificialIntelligence))
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[src], annotation_coordinate_type="2D", annotation_groups=[group],
        series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
        instance_number=1, **_equipment())
    return _as_plain(ann, study_uid)


def _sr(src: Dataset, study_uid: str, sop_class: str) -> Dataset:
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="cytonode conformance kit")))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="kit cells"),
        measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=42.0,
                                        unit=codes.UCUM.SquareMicrometer)])
    report = hd.sr.MeasurementReport(observation_context=observer,
                                     procedure_reported=codes.SCT.LightMicroscopy,
                                     imaging_measurements=[group])
    kwargs: dict[str, Any] = {
        "evidence": [src], "content": report, "series_instance_uid": hd.UID(),
        "series_number": 6, "sop_instance_uid": hd.UID(), "instance_number": 1,
        "manufacturer": "CytoNode conformance kit"}
    if sop_class.endswith(".88.34"):
        sr: Dataset = hd.sr.Comprehensive3DSR(**kwargs)
    elif sop_class.endswith(".88.33"):
        sr = hd.sr.ComprehensiveSR(**kwargs)
    elif sop_class.endswith(".88.22"):
        sr = hd.sr.EnhancedSR(**kwargs)
    else:
        sr = _basic_text_sr(src)
    return _as_plain(sr, study_uid, sop_class)


def _basic_text_sr(src: Dataset) -> Dataset:
    """A Basic Text SR (PS3.3 A.35.1): a titled container with one TEXT item."""
    ds = Dataset()
    ds.Modality, ds.ValueType, ds.ContinuityOfContent = "SR", "CONTAINER", "SEPARATE"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = src.StudyDate, src.StudyTime, ""
    ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "", "CytoNode conformance kit"
    ds.ContentDate, ds.ContentTime = src.StudyDate, src.StudyTime
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", \
        "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [title]
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [name]
    item.TextValue = "Conformance kit test object; not a clinical report."
    ds.ContentSequence = [item]
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    return ds


def _encapsulated_pdf(src: Dataset, study_uid: str) -> Dataset:
    """An Encapsulated PDF (PS3.3 A.45.1) of a one-line PDF, as the node writes its reports."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text="CytoNode conformance kit test document; not a clinical report.")
    document = bytes(pdf.output())
    ds = Dataset()
    ds.Modality, ds.ConversionType, ds.BurnedInAnnotation = "DOC", "WSD", "NO"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = src.StudyDate, src.StudyTime, ""
    ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "", "CytoNode conformance kit"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = src.StudyDate, src.StudyTime, ""
    ds.DocumentTitle, ds.ConceptNameCodeSequence = "Conformance kit test document", []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document + b"\0" * (len(document) % 2)
    ds.EncapsulatedDocumentLength = len(document)
    return _identity(ds, study_uid, 7, "1.2.840.10008.5.1.4.1.1.104.1")


def _as_plain(obj: Dataset, study_uid: str, sop_class: str | None = None) -> Dataset:
    """A plain pydicom copy of a highdicom object, moved into the kit study."""
    ds = Dataset()
    ds.update(obj)
    ds.file_meta = FileMetaDataset()
    return _identity(ds, study_uid, int(obj.get("SeriesNumber", 9) or 9),
                     sop_class or str(obj.SOPClassUID))


BUILDERS: dict[str, Callable[[Dataset, str], Dataset]] = {
    "1.2.840.10008.5.1.4.1.1.77.1.6": lambda src, study: copy.deepcopy(src),
    "1.2.840.10008.5.1.4.1.1.77.1.2": lambda src, study: _plain_image(src, study, "1.2.840.10008.5.1.4.1.1.77.1.2", 1),
    "1.2.840.10008.5.1.4.1.1.77.1.3": lambda src, study: _plain_image(src, study, "1.2.840.10008.5.1.4.1.1.77.1.3", 1),
    "1.2.840.10008.5.1.4.1.1.91.1": _annotations,
    "1.2.840.10008.5.1.4.1.1.66.4": lambda src, study: _seg(src, study, "FRACTIONAL"),
    "1.2.840.10008.5.1.4.1.1.66.7": lambda src, study: _seg(src, study, "LABELMAP"),
    "1.2.840.10008.5.1.4.1.1.30": _parametric_map,
    "1.2.840.10008.5.1.4.1.1.88.11": lambda src, study: _sr(src, study, "1.2.840.10008.5.1.4.1.1.88.11"),
    "1.2.840.10008.5.1.4.1.1.88.22": lambda src, study: _sr(src, study, "1.2.840.10008.5.1.4.1.1.88.22"),
    "1.2.840.10008.5.1.4.1.1.88.33": lambda src, study: _sr(src, study, "1.2.840.10008.5.1.4.1.1.88.33"),
    "1.2.840.10008.5.1.4.1.1.88.34": lambda src, study: _sr(src, study, "1.2.840.10008.5.1.4.1.1.88.34"),
    "1.2.840.10008.5.1.4.1.1.7": lambda src, study: _plain_image(src, study, "1.2.840.10008.5.1.4.1.1.7", 1),
    "1.2.840.10008.5.1.4.1.1.7.4": lambda src, study: _plain_image(src, study, "1.2.840.10008.5.1.4.1.1.7.4", 2),
    "1.2.840.10008.5.1.4.1.1.104.1": _encapsulated_pdf,
}


class ObjectFactory:
    """Builds each SOP class's base object once per run; :meth:`make` adds the syntax."""

    def __init__(self, study_uid: str | None = None) -> None:
        self.study_uid = study_uid or generate_uid()
        self.source = _wsm_source(self.study_uid)
        self._bases: dict[str, Dataset] = {}

    def base(self, sop_class: str) -> Dataset:
        if sop_class not in self._bases:
            self._bases[sop_class] = BUILDERS[sop_class](self.source, self.study_uid)
        return self._bases[sop_class]

    def make(self, sop_class: str, syntax: str, out_dir: Path) -> Path:
        """A Part 10 file of ``sop_class`` in ``syntax`` with a fresh SOP Instance UID."""
        ds = encode_as(self.base(sop_class), syntax)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        implicit = syntax == "1.2.840.10008.1.2"
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
        return path
