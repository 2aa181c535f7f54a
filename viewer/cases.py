"""A case is one analysed slide series: its stored results, the reviewers' edits, its versions.

The analysis result is read from ``results_dir/<series UID>/summary.json`` (and ``heatmaps.npz``),
written by the worker; the UID is checked before it names a path. Edits are replayed over the
algorithm's values to give each cell its current state.

A cell is *flagged* when the analysis sent it to review (``review``; suspected abnormal cells are
among them). A cell was *looked at* when a reviewer opened or selected it in the review (a
``cell_views`` row) or changed it. Every case page names the patient, the accession and the slide
(:func:`case_identity`).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flask import abort
from sqlalchemy import select

from dicom_node.encode.differential import Differential, cell_reason_labels, class_label
from dicom_node.jobs.result import JobResult, SlideSummary
from dicom_node.settings import Settings
from dicom_node.store import queries
from dicom_node.store.files import Store, valid_uid
from dicom_node.store.states import JobStateValues
from viewer.models import CaseVersion, CellEdit, CellView

#: Worklist states.
RECEIVED, ANALYSING, READY, SIGNED, FAILED = (
    "received", "analysing", "ready for review", "signed", "failed")

_cache_lock = threading.Lock()
_summary_cache: dict[Path, tuple[float, dict[str, Any]]] = {}
_heatmap_cache: dict[Path, tuple[float, dict[str, np.ndarray]]] = {}
_slide_ids_cache: dict[str, dict[str, str]] = {}


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def checked_uid(series_instance_uid: str) -> str:
    """The UID if it is a valid one, else 404 (an unknown case: never a path from raw input)."""
    if not (len(series_instance_uid) <= 64 and _UID_RE.fullmatch(series_instance_uid)
            and valid_uid(series_instance_uid)):
        abort(404)
    return series_instance_uid


def results_path(settings: Settings, series_instance_uid: str) -> Path:
    return settings.results_dir / checked_uid(series_instance_uid)


def load_summary(settings: Settings, series_instance_uid: str) -> dict[str, Any]:
    """The worker's ``summary.json`` of the series (cached by modification time); 404 if none."""
    path = results_path(settings, series_instance_uid) / "summary.json"
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        abort(404)
    with _cache_lock:
        hit = _summary_cache.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
    summary = SlideSummary.from_json(path.read_text()).as_dict()  # refuses an unknown schema
    with _cache_lock:
        _summary_cache[path] = (mtime, summary)
    return summary  # type: ignore[no-any-return]


def load_heatmaps(settings: Settings, series_instance_uid: str) -> dict[str, np.ndarray]:
    """Heatmap arrays by kind (empty when the analysis made none)."""
    path = results_path(settings, series_instance_uid) / "heatmaps.npz"
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {}
    with _cache_lock:
        hit = _heatmap_cache.get(path)
        if hit and hit[0] == mtime:
            return hit[1]
    with np.load(path) as npz:
        arrays = {key: np.asarray(npz[key], dtype=np.float32) for key in npz.files}
    with _cache_lock:
        _heatmap_cache[path] = (mtime, arrays)
    return arrays


@dataclass
class CaseState:
    """A case as the viewer shows it: cells with their current values, versions, lock state."""

    series_instance_uid: str
    summary: dict[str, Any]
    cells: list[dict[str, Any]]
    edits: list[CellEdit]
    versions: list[CaseVersion]
    identity: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.versions[-1].version if self.versions else 1

    @property
    def signed(self) -> bool:
        """True when the latest version is signed: the case is read-only until an amendment."""
        return bool(self.versions) and self.versions[-1].signed_at is not None

    def cell(self, cell_id: int) -> dict[str, Any]:
        for cell in self.cells:
            if cell["cell_id"] == cell_id:
                return cell
        abort(404)

    def changes(self) -> list[dict[str, Any]]:
        """Cells whose current values differ from the algorithm's."""
        return [c for c in self.cells if c["changed"]]

    @property
    def domain(self) -> str:
        """The slide quality check's verdict ("inside the validated domain", or "outside the
        validated domain: <reasons>"), or "" for results written before the check existed."""
        params = self.summary.get("provenance", {}).get("parameters", {})
        return str(params.get("validated_domain", ""))

    @property
    def site_calibration(self) -> str:
        params = self.summary.get("provenance", {}).get("parameters", {})
        return str(params.get("site_calibration", ""))

    @property
    def site_verified(self) -> str:
        """How well the node read the cells the site's staff named (``calibrate-site
        --labelled``), as the report states it ("": the site named none)."""
        params = self.summary.get("provenance", {}).get("parameters", {})
        return str(params.get("site_verified", ""))

    @property
    def site_calibration_warning(self) -> str:
        """Why the site calibration was not used, or does not match the review rule ("": none)."""
        params = self.summary.get("provenance", {}).get("parameters", {})
        return str(params.get("site_calibration_warning", ""))

    def report(self) -> Differential:
        """The differential of the current (reviewed) classes, with the analysis' flags."""
        return Differential.from_cells(self.cells,
                                       platelets_detected=self.summary.get("platelets_detected"))

    def unreviewed_flagged(self) -> list[dict[str, Any]]:
        """Flagged cells nobody looked at (opened, selected or changed in the review)."""
        return [c for c in self.cells if c["flagged"] and not c["looked_at"]]


def case_identity(store: Store, series_instance_uid: str) -> dict[str, str]:
    """Who and what the case is: patient name (``^`` as spaces), patient ID, accession number,
    the slide's container identifier and specimen identifier (read once from a stored image)."""
    study = queries.study_of_series(store, series_instance_uid)
    identity = {
        "patient_name": " ".join(p for p in (study.patient_name if study else "").split("^") if p),
        "patient_id": study.patient_id if study else "",
        "accession_number": study.accession_number if study else "",
    }
    return {**identity, **_slide_ids(store, series_instance_uid)}


def _slide_ids(store: Store, series_instance_uid: str) -> dict[str, str]:
    """Container and specimen identifiers of the slide, read from one stored image the first
    time (cached: a stored image does not change)."""
    with _cache_lock:
        cached = _slide_ids_cache.get(series_instance_uid)
    if cached is not None:
        return cached
    paths = queries.slide_files(store, series_instance_uid).paths
    path = paths[0] if paths else None
    slide_ids = {"container_identifier": "", "specimen_identifier": ""}
    if path is None:  # not stored (yet): nothing to cache
        return slide_ids
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["ContainerIdentifier", "SpecimenDescriptionSequence"])
        specimens = ds.get("SpecimenDescriptionSequence") or []
        slide_ids = {"container_identifier": str(ds.get("ContainerIdentifier") or ""),
                     "specimen_identifier": ", ".join(
                         str(s.get("SpecimenIdentifier") or "") for s in specimens
                         if s.get("SpecimenIdentifier"))}
    except (OSError, ValueError, AttributeError):
        pass
    with _cache_lock:
        _slide_ids_cache[series_instance_uid] = slide_ids
    return slide_ids


def case_state(store: Store, series_instance_uid: str) -> CaseState:
    """Load a case (404 if it has no analysis result)."""
    summary = load_summary(store.settings, series_instance_uid)
    with store.session() as db:
        edits = list(db.scalars(select(CellEdit).where(
            CellEdit.series_instance_uid == series_instance_uid).order_by(CellEdit.id)).all())
        versions = list(db.scalars(select(CaseVersion).where(
            CaseVersion.series_instance_uid == series_instance_uid)
            .order_by(CaseVersion.version)).all())
        viewed = set(db.scalars(select(CellView.cell_id).where(
            CellView.series_instance_uid == series_instance_uid)).all())
    cells = []
    for original in summary.get("cells", []):
        cell = dict(original)
        cell["original_label"] = original["label"]
        cell["original_abnormal"] = bool(original.get("abnormal"))
        cell["unclassifiable"] = False
        cell["flagged"] = bool(original.get("review"))  # suspected abnormal cells are among them
        cell["review_labels"] = cell_reason_labels(original) if cell["flagged"] else []
        cells.append(cell)
    by_id = {c["cell_id"]: c for c in cells}
    for edit in edits:
        target = by_id.get(edit.cell_id)
        if target is None or edit.undone:
            continue
        if edit.field == "label":
            target["label"] = edit.new_value
        elif edit.field == "abnormal":
            target["abnormal"] = edit.new_value == "true"
        elif edit.field == "unclassifiable":
            target["unclassifiable"] = edit.new_value == "true"
    for cell in cells:
        cell["changed"] = (cell["label"] != cell["original_label"]
                           or bool(cell["abnormal"]) != cell["original_abnormal"]
                           or cell["unclassifiable"])
        cell["edited"] = any(e.cell_id == cell["cell_id"] and not e.undone for e in edits)
        cell["looked_at"] = cell["cell_id"] in viewed or any(e.cell_id == cell["cell_id"] for e in edits)
        cell["name"] = "unclassifiable" if cell["unclassifiable"] else class_label(cell["label"])
    return CaseState(series_instance_uid, summary, cells, edits, versions,
                     case_identity(store, series_instance_uid))


def worklist(store: Store) -> list[dict[str, Any]]:
    """One row per received slide series (not the node's own result series)."""
    rows = queries.worklist_cases(store)  # received slide series only
    with store.session() as db:
        versions = db.scalars(select(CaseVersion).order_by(CaseVersion.version)).all()
    latest: dict[str, CaseVersion] = {}
    for version in versions:
        latest[version.series_instance_uid] = version
    items = []
    for row in rows:
        series, study, job = row.series, row.study, row.job
        result: dict[str, Any] = {}
        if job is not None and job.result_json:
            try:
                result = JobResult.from_json(job.result_json).as_dict()
            except ValueError:  # ResultSchemaError included: not a result this viewer knows
                result = {}
        if job is None:
            status = RECEIVED
        elif job.state == JobStateValues.FAILED:
            status = FAILED
        elif job.state != JobStateValues.DONE:
            status = ANALYSING
        else:
            status = READY
        version = latest.get(series.series_instance_uid)
        if status == READY and version is not None and version.signed_at is not None:
            status = SIGNED
        items.append({
            "series_instance_uid": series.series_instance_uid,
            "study_instance_uid": study.study_instance_uid,
            "patient_name": study.patient_name, "patient_id": study.patient_id,
            "accession_number": study.accession_number, "study_date": study.study_date,
            "study_description": study.study_description,
            "series_description": series.series_description,
            "received_at": series.last_received_at,
            "status": status,
            "progress": job.progress if job is not None else "",
            "cell_count": result.get("cell_count"),
            "flagged": (result.get("review", 0) or 0) if result else None,
            "flag_text": (result.get("report") or {}).get("text", {}).get("flags")
            or (f"{result.get('review', 0) or 0} flagged for review" if result else None),
            "abnormal": result.get("abnormal") if result else None,
            "version": version.version if version is not None else 1,
        })
    return items
