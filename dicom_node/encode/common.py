"""What the three encoders share: their parameters, the source slide, equipment, provenance."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from importlib import metadata

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from analysis.results import SlideResult
from dicom_node.encode import codes

VL_WSM = "1.2.840.10008.5.1.4.1.1.77.1.6"
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 9.1


def _is_uid(value: str) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def _software_version() -> str:
    try:
        return f"cytonode {metadata.version('cytonode')}"
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "cytonode"


@dataclasses.dataclass(frozen=True)
class EncoderParams:
    """Who writes the objects and how their series are numbered.

    Parameters
    ----------
    manufacturer, manufacturer_model_name, software_versions, device_serial_number:
        The General Equipment module of every object we write (our node).
    institution_name:
        Optional Institution Name (0008,0080).
    device_observer_uid:
        Device Observer UID of the SR (TID 1004); stable for one node. Empty:
        derived from manufacturer, model and serial number.
    sr_series_number, ann_series_number, seg_series_number:
        Series Number of each object kind: one new series per kind, fixed numbers
        well clear of the scanner's series (never random; STYLE.md 8).
    """

    manufacturer: str = "CytoNode"
    manufacturer_model_name: str = "CytoNode"
    software_versions: str = dataclasses.field(default_factory=_software_version)
    device_serial_number: str = "0"
    institution_name: str | None = None
    device_observer_uid: str = ""
    sr_series_number: int = 900
    ann_series_number: int = 901
    seg_series_number: int = 902

    def __post_init__(self) -> None:
        for name in ("manufacturer", "manufacturer_model_name", "software_versions",
                     "device_serial_number"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
                raise ValueError(f"{name} must be 1-64 characters without a backslash (LO), not {value!r}")
        numbers = [self.sr_series_number, self.ann_series_number, self.seg_series_number]
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number < 2**31:
                raise ValueError(f"series numbers must be positive ints (IS), not {number!r}")
        if len(set(numbers)) != 3:
            raise ValueError("sr_series_number, ann_series_number and seg_series_number must differ")
        if not self.device_observer_uid:
            uid = generate_uid(entropy_srcs=[self.manufacturer, self.manufacturer_model_name,
                                             self.device_serial_number])
            object.__setattr__(self, "device_observer_uid", str(uid))
        elif not _is_uid(self.device_observer_uid):
            raise ValueError(f"device_observer_uid is not a valid UID: {self.device_observer_uid!r}")


def base_level(result: SlideResult, source_datasets: Sequence[Dataset]) -> Dataset:
    """The source instance that holds the base level the result's geometry refers to.

    Checks that the source datasets are the slide the result was computed on.

    Raises
    ------
    ValueError
        If no dataset is a base-level instance named by the result, or study,
        frame of reference, size or spacing differ from the result.
    """
    if not source_datasets:
        raise ValueError("source_datasets must hold the slide's instances")
    matches = [ds for ds in source_datasets
               if ds.get("SOPInstanceUID") in result.sop_instance_uids]
    if not matches:
        raise ValueError("source_datasets hold none of the result's base-level sop_instance_uids")
    ds = matches[0]
    if ds.get("SOPClassUID") != VL_WSM:
        raise ValueError("source_datasets: the base level must be a VL Whole Slide Microscopy image")
    for ds_other in source_datasets:
        if ds_other.get("StudyInstanceUID") != result.study_instance_uid:
            raise ValueError("source_datasets must all belong to the result's study")
    checks = (
        ("SeriesInstanceUID", ds.get("SeriesInstanceUID"), result.series_instance_uid),
        ("FrameOfReferenceUID", ds.get("FrameOfReferenceUID"), result.frame_of_reference_uid),
        ("TotalPixelMatrixColumns", ds.get("TotalPixelMatrixColumns"), result.total_pixel_matrix_columns),
        ("TotalPixelMatrixRows", ds.get("TotalPixelMatrixRows"), result.total_pixel_matrix_rows),
    )
    for keyword, found, expected in checks:
        if found != expected:
            raise ValueError(f"source_datasets: base level {keyword} is {found!r}, the result says {expected!r}")
    spacing = pixel_spacing(ds)
    if not np.allclose(spacing, result.pixel_spacing_mm, rtol=1e-6, atol=0.0):
        raise ValueError(f"source_datasets: base level pixel spacing {spacing} differs from the "
                         f"result's {result.pixel_spacing_mm}")
    return ds


def pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """Pixel Spacing of a tiled image from its shared functional groups (PS3.3 C.7.6.16.2.1)."""
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    return float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])


def image_to_slide(ds: Dataset, points: np.ndarray) -> np.ndarray:
    """Map image coordinates ``(x, y)`` of the total pixel matrix to slide coordinates (mm).

    Uses highdicom's transformer (image origin at the top left corner of the top
    left pixel). Returns ``(n, 3)`` float64.
    """
    transformer = hd.spatial.ImageToReferenceTransformer.for_image(ds, for_total_pixel_matrix=True)
    return transformer(np.asarray(points, dtype=np.float64))


def contributing_equipment(result: SlideResult, params: EncoderParams) -> list[hd.ContributingEquipment]:
    """The model that analysed the slide, as Processing Equipment (PS3.3 C.12.1.1.5).

    highdicom adds the source's Acquisition Equipment and itself on its own.
    """
    provenance = result.provenance
    return [hd.ContributingEquipment(
        manufacturer=params.manufacturer,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=provenance.name,
        software_versions=[provenance.version, params.software_versions],
        device_serial_number=params.device_serial_number,
        institution_name=params.institution_name,
        contribution_description=(f"White-cell detection and classification; weights sha256 "
                                  f"{provenance.weights_sha256}"),
    )]


def algorithm_parameters(result: SlideResult) -> dict[str, str]:
    """The model's parameters as strings, with the weights hash (for Algorithm Parameters)."""
    params = {key: str(value) for key, value in sorted(result.provenance.parameters.items())}
    params["weights_sha256"] = result.provenance.weights_sha256
    return params


def algorithm_identification(result: SlideResult) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (PS3.3 C.8.32.3.1 / 10.16) of the model."""
    return hd.AlgorithmIdentificationSequence(
        name=result.provenance.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=result.provenance.version,
        parameters=algorithm_parameters(result),
    )


def new_uid(value: str | None) -> str:
    """``value`` if given (and valid), else a new UID."""
    if value is None:
        return str(hd.UID())
    if not _is_uid(value):
        raise ValueError(f"{value!r} is not a valid UID")
    return value


def cell_tracking_uid(cell_id: int, *, series_instance_uid: str, sop_instance_uids: Sequence[str],
                      weights_sha256: str) -> str:
    """The Tracking UID of one cell (TID 1410, PS3.16): the same in every object made from one
    result, so the viewer's final SR names a cell by the UID the preliminary SR gave it.

    The one rule for it: the preliminary encoders call it with a :class:`SlideResult`'s values,
    the viewer with the same values read back from the stored summary.

    Parameters
    ----------
    cell_id:
        The cell's id in the result.
    series_instance_uid:
        Series Instance UID of the analysed slide.
    sop_instance_uids:
        SOP Instance UIDs of the slide's base level, in the result's order.
    weights_sha256:
        SHA-256 of the model weights (``ModelProvenance.weights_sha256``).

    Returns
    -------
    str
        A UID derived from those values (pydicom's ``generate_uid`` with ``entropy_srcs``).
    """
    return str(generate_uid(entropy_srcs=[series_instance_uid, *sop_instance_uids,
                                          weights_sha256, f"cell {cell_id}"]))
