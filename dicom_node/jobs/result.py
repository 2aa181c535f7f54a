"""The typed, versioned hand-over of a slide's analysis: what the worker writes, what others read.

Two documents leave a job, each a frozen dataclass written and read as JSON with a ``schema``
field naming its kind and version:

- :class:`JobResult` (``cytonode.job-result/1``): the job row's ``result_json``, read by
  ``cytonode status`` (:mod:`dicom_node.store.overview`), the demo and the viewer's worklist;
- :class:`SlideSummary` (``cytonode.slide-summary/1``): ``summary.json`` in the series' results
  folder (and ``cytonode analyze --out``), read by the viewer's case pages and the demo.

``from_json`` refuses (:class:`ResultSchemaError`, a ``ValueError``) a document of another kind
or version, or one that lacks a field; a document without ``schema`` is one written before the
field existed, whose content is version 1's, and is read as version 1. Unknown extra fields are
ignored (a reader tolerates what a later minor addition writes).

:func:`write_summary` builds and writes the summary of a :class:`analysis.results.SlideResult`;
:func:`stage_recorder` keeps the pipeline's stage timings that both documents carry.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

#: Version of both documents' schema; a reader refuses any other.
SCHEMA_VERSION = 1
#: ``summary.json``'s name in a results folder.
SUMMARY = "summary.json"
#: The DICOM objects ``cytonode analyze`` writes into ``--out``, by kind (``summary.json``'s
#: ``files`` name them).
OUTPUT_FILES = {"sr": "sr.dcm", "ann": "ann.dcm", "seg": "seg.dcm", "pdf": "pdf.dcm", "sc": "sc.dcm"}

class ResultSchemaError(ValueError):
    """A result document of an unknown kind or version, or one with a missing or wrong field."""


@dataclasses.dataclass(frozen=True)
class _Document:
    """Shared JSON reading and writing of the hand-over documents."""

    KIND: ClassVar[str] = ""
    #: JSON types of each field (``None`` in the tuple: the field may be null).
    TYPES: ClassVar[Mapping[str, tuple[type | None, ...]]] = {}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            allowed = self.TYPES[field.name]
            if value is None and None in allowed:
                continue
            types = tuple(t for t in allowed if t is not None)
            if isinstance(value, bool) and bool not in types:
                ok = False
            else:
                ok = isinstance(value, types)
            if not ok:
                names = " or ".join("null" if t is None else t.__name__ for t in allowed)
                raise ResultSchemaError(f"{self.KIND}: field {field.name!r} must be {names}, "
                                        f"not {type(value).__name__}")

    @classmethod
    def schema(cls) -> str:
        """The ``schema`` value this class writes, e.g. ``cytonode.job-result/1``."""
        return f"{cls.KIND}/{SCHEMA_VERSION}"

    def as_dict(self) -> dict[str, Any]:
        """The document as plain JSON values, ``schema`` first."""
        return {"schema": self.schema(),
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def to_json(self, indent: int | None = None) -> str:
        """The document as JSON text."""
        return json.dumps(self.as_dict(), indent=indent)

    @classmethod
    def from_dict(cls, document: Any) -> Self:
        """Read a parsed document.

        Raises
        ------
        ResultSchemaError
            If it is not a JSON object, names another kind or version, or lacks a field.
        """
        if not isinstance(document, dict):
            raise ResultSchemaError(f"{cls.KIND}: a document must be a JSON object, "
                                    f"not {type(document).__name__}")
        schema = document.get("schema", cls.schema())  # none: written before the field existed
        if schema != cls.schema():
            raise ResultSchemaError(f"{cls.KIND}: unknown schema {schema!r}; this reader knows "
                                    f"{cls.schema()!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in document]
        if missing:
            raise ResultSchemaError(f"{cls.KIND}: missing field(s) {', '.join(missing)}")
        return cls(**{n: document[n] for n in names})

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Read a document from JSON text (see :meth:`from_dict`).

        Raises
        ------
        ResultSchemaError
            If the text is not JSON, or :meth:`from_dict` refuses it.
        """
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ResultSchemaError(f"{cls.KIND}: not JSON ({exc})") from exc
        return cls.from_dict(document)


_INT, _FLOAT, _STR = (int,), (int, float), (str,)


@dataclasses.dataclass(frozen=True)
class JobResult(_Document):
    """What a finished analysis job records on its row (``Job.result_json``).

    Parameters
    ----------
    levels, width, height, pixel_spacing_um:
        The slide as it was opened (:meth:`analysis.tiles.Slide.metadata`): its pyramid levels,
        the base level's size and pixel spacing (``[column, row]`` um, ``None`` without Pixel
        Measures).
    instances, frames:
        How many VL WSM instances and frames the series held.
    results_dir:
        The folder holding ``summary.json`` and ``heatmaps.npz``.
    timings_s:
        Seconds per stage (``read``, ``detect``, ``crop``, ``classify``, ``heatmap``, ``encode``).
    cell_count, review, abnormal:
        White cells classified, flagged for review, suspected abnormal.
    differential, report:
        :meth:`Differential.rows` and :meth:`Differential.as_json` of the result.
    validated_domain, site_calibration:
        The slide's domain check and the site calibration used, in words.
    objects:
        SOP Instance UID of each stored result object, by kind (``sr``, ``ann``, ...).
    """

    KIND: ClassVar[str] = "cytonode.job-result"
    TYPES: ClassVar[Mapping[str, tuple[type | None, ...]]] = {
        "levels": (list,), "width": _INT, "height": _INT, "pixel_spacing_um": (list, None),
        "instances": _INT, "frames": _INT, "results_dir": _STR, "timings_s": (dict,),
        "cell_count": _INT, "differential": (list,), "report": (dict,), "review": _INT,
        "abnormal": _INT, "validated_domain": _STR, "site_calibration": _STR, "objects": (dict,),
    }

    levels: list[dict[str, Any]]
    width: int
    height: int
    pixel_spacing_um: list[float] | None
    instances: int
    frames: int
    results_dir: str
    timings_s: dict[str, float]
    cell_count: int
    differential: list[dict[str, Any]]
    report: dict[str, Any]
    review: int
    abnormal: int
    validated_domain: str
    site_calibration: str
    objects: dict[str, str]


@dataclasses.dataclass(frozen=True)
class SlideSummary(_Document):
    """``summary.json``: one analysed slide, every cell, the differential and the provenance.

    Parameters
    ----------
    slide:
        ``path``, ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uids`` (base
        level), ``total_pixel_matrix`` (columns, rows) and ``pixel_spacing_mm``.
    cell_count, platelets_detected:
        White cells classified; platelets the detector counted (``None``: not counted).
    differential, report, interval:
        The rows and the report of :class:`dicom_node.encode.differential.Differential`, and
        what the intervals are, in words.
    flagged, cells:
        The cells flagged for review, and every cell (:func:`cell_json`).
    heatmaps:
        ``kind``, ``shape`` and ``cell_size_px`` of each grid in ``heatmaps.npz``.
    timings_s, provenance, files:
        Seconds per stage; the model's name, version, weights hash and parameters; each
        result object's file name and UIDs, by kind.
    """

    KIND: ClassVar[str] = "cytonode.slide-summary"
    TYPES: ClassVar[Mapping[str, tuple[type | None, ...]]] = {
        "slide": (dict,), "cell_count": _INT, "platelets_detected": (int, None),
        "differential": (list,), "report": (dict,), "interval": _STR, "flagged": (list,),
        "cells": (list,), "heatmaps": (list,), "timings_s": (dict,), "provenance": (dict,),
        "files": (dict,),
    }
    SLIDE_KEYS: ClassVar[tuple[str, ...]] = (
        "path", "study_instance_uid", "series_instance_uid", "sop_instance_uids",
        "total_pixel_matrix", "pixel_spacing_mm")

    slide: dict[str, Any]
    cell_count: int
    platelets_detected: int | None
    differential: list[dict[str, Any]]
    report: dict[str, Any]
    interval: str
    flagged: list[dict[str, Any]]
    cells: list[dict[str, Any]]
    heatmaps: list[dict[str, Any]]
    timings_s: dict[str, float]
    provenance: dict[str, Any]
    files: dict[str, dict[str, str]]

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [k for k in self.SLIDE_KEYS if k not in self.slide]
        if missing:
            raise ResultSchemaError(f"{self.KIND}: field 'slide' lacks {', '.join(missing)}")
        if self.cell_count != len(self.cells):
            raise ResultSchemaError(f"{self.KIND}: cell_count {self.cell_count} but "
                                    f"{len(self.cells)} cells")

    @classmethod
    def from_result(cls, result: Any, slide: Path | str, objects: Mapping[str, Any],
                    timings: Mapping[str, float], counts: Mapping[str, int]) -> SlideSummary:
        """The summary of an :class:`analysis.results.SlideResult` and its encoded ``objects``."""
        from dicom_node.encode.differential import Differential

        cells = [cell_json(c) for c in result.cells]
        return cls(
            slide={
                "path": str(slide),
                "study_instance_uid": result.study_instance_uid,
                "series_instance_uid": result.series_instance_uid,
                "sop_instance_uids": list(result.sop_instance_uids),
                "total_pixel_matrix": [result.total_pixel_matrix_columns,
                                       result.total_pixel_matrix_rows],
                "pixel_spacing_mm": list(result.pixel_spacing_mm),
            },
            cell_count=len(result.cells),
            platelets_detected=counts.get("platelets"),
            differential=differential(result),
            report=Differential.from_result(
                result, platelets_detected=counts.get("platelets")).as_json(),
            interval="95 % Wilson score interval of the percentage of white cells",
            flagged=[c for c in cells if c["review"]],
            cells=cells,
            heatmaps=[{"kind": h.kind.value, "shape": list(h.shape), "cell_size_px": h.cell_size_px}
                      for h in result.heatmaps],
            timings_s=dict(timings),
            provenance={
                "name": result.provenance.name, "version": result.provenance.version,
                "weights_sha256": result.provenance.weights_sha256,
                "parameters": dict(result.provenance.parameters),
            },
            files={kind: {"path": OUTPUT_FILES[kind], "sop_instance_uid": str(ds.SOPInstanceUID),
                          "series_instance_uid": str(ds.SeriesInstanceUID)}
                   for kind, ds in objects.items()},
        )


def read_summary(folder: Path) -> SlideSummary:
    """The ``summary.json`` of a results folder.

    Raises
    ------
    FileNotFoundError
        If the folder holds none.
    ResultSchemaError
        If it is not a summary this reader knows.
    """
    return SlideSummary.from_json((folder / SUMMARY).read_text())


def write_summary(out: Path, result: Any, slide: Path | str, objects: Mapping[str, Any],
                  timings: Mapping[str, float], counts: Mapping[str, int]) -> SlideSummary:
    """Write ``summary.json`` (a :class:`SlideSummary`) and, when there are heatmaps,
    ``heatmaps.npz`` (one float32 array per kind on the grid ``summary["heatmaps"]`` describes)
    into ``out``; return the summary written. Each file is replaced whole, never half written."""
    import numpy as np

    summary = SlideSummary.from_result(result, slide, objects, timings, counts)
    out.mkdir(parents=True, exist_ok=True)
    if result.heatmaps:
        tmp = out / "heatmaps.tmp.npz"
        np.savez_compressed(tmp, **{h.kind.value: h.values.astype(np.float32) for h in result.heatmaps})
        os.replace(tmp, out / "heatmaps.npz")
    path = out / SUMMARY
    tmp_json = out / (SUMMARY + ".tmp")
    tmp_json.write_text(summary.to_json(indent=1) + "\n")
    os.replace(tmp_json, path)
    return summary


def differential(result: Any) -> list[dict[str, Any]]:
    """One row per class (:meth:`dicom_node.encode.differential.Differential.rows`): white cells
    with percentage of white cells and 95 % Wilson interval, erythroblasts per 100 white cells,
    platelets counted only."""
    from dicom_node.encode.differential import Differential

    return Differential.from_result(result).rows()


def cell_json(cell: Any) -> dict[str, Any]:
    """One :class:`analysis.results.CellResult` as ``summary.json`` lists it."""
    return {
        "cell_id": cell.cell_id, "x": round(cell.x, 1), "y": round(cell.y, 1),
        "bbox": list(cell.bbox), "area_um2": round(cell.area_um2, 2),
        "label": cell.label.value, "probability": round(cell.probability, 6),
        "probabilities": {k: round(float(v), 6) for k, v in cell.probabilities.items()},
        "uncertainty": round(cell.uncertainty, 6), "anomaly_score": round(cell.anomaly_score, 6),
        "review": cell.review,
        "review_reason": cell.review_reason.value if cell.review_reason else None,
        "review_reasons": [r.value for r in cell.review_reasons],
        **{key: getattr(cell, key).value for key in ("diffusion_label", "reference_label")
           if getattr(cell, key, None) is not None},
        "abnormal": cell.abnormal,
        "abnormal_reason": cell.abnormal_reason.value if cell.abnormal_reason else None,
    }


def stage_recorder(timings: dict[str, float], counts: dict[str, int],
                   then: Callable[[Any], None] | None = None) -> Callable[[Any], None]:
    """A pipeline progress callback that keeps each finished stage's time in ``timings`` and its
    counts in ``counts``, then passes the event on to ``then`` (if given)."""
    def record(event: Any) -> None:
        if event.finished:
            timings[event.stage] = round(event.elapsed_s, 3)
            counts.update(event.counts)
        if then is not None:
            then(event)

    return record
