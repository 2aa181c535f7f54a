"""Real DICOM objects for tests, built from real images (BCCD fields, MIT) or from the
highdicom test files with fresh UIDs."""

from __future__ import annotations

import copy
import math
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.peers import BCCD_IMAGES

if TYPE_CHECKING:
    from analysis.results import CellResult, HeatmapGrid, ModelProvenance, SlideResult

MF_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"


def bccd_fields(count: int, start: int = 0) -> list[Path]:
    files = sorted(BCCD_IMAGES.glob("*.jpg"))
    return [files[(start + i) % len(files)] for i in range(count)]


def multiframe_sc(out: Path, frames: int, *, start: int = 0, study_uid: str | None = None,
                  series_uid: str | None = None) -> Path:
    """A Multi-frame True Color Secondary Capture of ``frames`` BCCD fields (uncompressed)."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in bccd_fields(frames, start)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MF_TRUE_COLOR_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "TEST01", "Test^Smear", "OT"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20261129", "120000", "", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.StudyID = 1, 1, "1"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def with_new_uids(source: Path, out: Path, *, series_uid: str | None = None,
                  study_uid: str | None = None) -> Path:
    """A copy of ``source`` under a new SOP Instance UID (and optionally series/study)."""
    ds = dcmread(source)
    ds = copy.deepcopy(ds)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    if study_uid:
        ds.StudyInstanceUID = study_uid
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def dataset_digest(path: Path) -> tuple[str, str, bytes]:
    """(SOP Instance UID, transfer syntax, pixel/content bytes) for comparing copies."""
    ds = dcmread(path)
    content = ds.PixelData if "PixelData" in ds else ds.to_json().encode()
    return str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), bytes(content)


def comprehensive_3d_sr(evidence: Path, out: Path) -> Path:
    """A small TID 1500 measurement report (highdicom) that references ``evidence``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ref = dcmread(evidence)
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="cytonode test device")))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="test cells"),
        measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=42.0,
                                        unit=codes.UCUM.SquareMicrometer)])
    report = hd.sr.MeasurementReport(observation_context=observer,
                                     procedure_reported=codes.SCT.LightMicroscopy,
                                     imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=[ref], content=report, series_instance_uid=hd.UID(),
                                 series_number=10, sop_instance_uid=hd.UID(), instance_number=1,
                                 manufacturer="CytoNode tests")
    out.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(out, enforce_file_format=True)
    return out


def ellipse_outline(bbox: tuple[int, int, int, int], n: int = 16) -> tuple[tuple[float, float], ...]:
    """``n`` points of the ellipse inscribed in ``bbox`` (x0, y0, x1, y1): a cell outline."""
    x0, y0, x1, y1 = bbox
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return tuple((round(cx + rx * math.cos(a), 3), round(cy + ry * math.sin(a), 3))
                 for a in np.linspace(0.0, 2.0 * math.pi, n, endpoint=False))


def slide_result(base: Dataset, cells: Iterable[CellResult], provenance: ModelProvenance,
                 heatmaps: Iterable[HeatmapGrid] = ()) -> SlideResult:
    """A result on the slide whose base level is ``base``: its UIDs, size and pixel spacing."""
    from analysis.results import SlideResult
    from dicom_node.encode.common import pixel_spacing

    return SlideResult(
        study_instance_uid=base.StudyInstanceUID, series_instance_uid=base.SeriesInstanceUID,
        sop_instance_uids=(base.SOPInstanceUID,), frame_of_reference_uid=base.FrameOfReferenceUID,
        total_pixel_matrix_columns=int(base.TotalPixelMatrixColumns),
        total_pixel_matrix_rows=int(base.TotalPixelMatrixRows),
        pixel_spacing_mm=pixel_spacing(base), cells=tuple(cells), provenance=provenance,
        heatmaps=tuple(heatmaps))


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) reports on ``path``; skips without dciodvfy."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False,
                         timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def nested_sequences(depth: int) -> bytes:
    """Explicit VR little endian bytes of (0040,A730) Content Sequence nested ``depth`` deep,
    sequences and items of undefined length, around one (0040,A040) element."""
    inner = struct.pack("<HH2sH", 0x0040, 0xA040, b"CS", 4) + b"TEXT"
    for _ in range(depth):
        inner = (struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
                 + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
                 + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return inner


def deflate(data: bytes) -> bytes:
    """``data`` as a raw deflate stream, as Deflated Explicit VR Little Endian sends it (PS3.5 A.5)."""
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def deflate_bomb(prefix: bytes, zeros: int) -> bytes:
    """``prefix`` followed by ``zeros`` zero bytes as one raw deflate stream (PS3.5 A.5), built
    from a single compressed MiB repeated: about 1 KB on the wire for each MiB it inflates to.

    After a full flush the compressor starts afresh, so each flushed MiB of zeros compresses to
    the same bytes and the stream need not be compressed whole.
    """
    mib = 1 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = z.compress(prefix) + z.flush(zlib.Z_FULL_FLUSH)
    if zeros >= mib:
        stream += (z.compress(bytes(mib)) + z.flush(zlib.Z_FULL_FLUSH)) * (zeros // mib)
    return stream + z.compress(bytes(zeros % mib)) + z.flush()
