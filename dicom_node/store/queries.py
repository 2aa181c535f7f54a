"""The questions the rest of the product asks of the node's index, each written once.

The viewer, the worker and sign-off read the node's tables only through these functions (and
the :class:`~dicom_node.store.files.Store` methods); none of them writes SQL on ``studies``,
``series``, ``instances`` or ``jobs`` itself. Each answer is a frozen dataclass or a plain value,
never an ORM row, so nothing outside the store depends on the index's columns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy import exists, select

from dicom_node.settings import VL_WSM
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, Job, Series, Study
from dicom_node.store.states import SeriesRoutingValues


@dataclasses.dataclass(frozen=True)
class SlideFiles:
    """The stored VL Whole Slide Microscopy instances of one series (one slide).

    ``paths`` are sorted, so two reads of an unchanged slide compare equal.
    """

    series_instance_uid: str
    paths: tuple[Path, ...]
    frames: int

    def __bool__(self) -> bool:
        return bool(self.paths)


def slide_files(store: Store, series_instance_uid: str) -> SlideFiles:
    """The VL Whole Slide Microscopy instances of ``series_instance_uid`` (none: an empty
    :class:`SlideFiles`)."""
    with store.session() as session:
        instances = session.scalars(select(Instance).where(
            Instance.series_instance_uid == series_instance_uid,
            Instance.sop_class_uid == VL_WSM)).all()
        paths = tuple(sorted(store.path_of(i) for i in instances))
        frames = sum(int(i.number_of_frames or 0) for i in instances)
    return SlideFiles(series_instance_uid, paths, frames)


def instance_path(store: Store, sop_instance_uid: str) -> Path | None:
    """The file of the stored instance ``sop_instance_uid``; None when the store does not hold it."""
    with store.session() as session:
        instance = session.get(Instance, sop_instance_uid)
        return store.path_of(instance) if instance is not None else None


@dataclasses.dataclass(frozen=True)
class StudyOfSeries:
    """The study a series belongs to, with the patient and accession it names (PS3.3 C.7.1.1,
    C.7.2.1). The text fields are "" when the index holds no value."""

    study_instance_uid: str
    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""


def study_of_series(store: Store, series_instance_uid: str) -> StudyOfSeries | None:
    """The study of ``series_instance_uid``; None when the index does not know the series."""
    with store.session() as session:
        row = session.execute(
            select(Series.study_instance_uid, Study)
            .outerjoin(Study, Study.study_instance_uid == Series.study_instance_uid)
            .where(Series.series_instance_uid == series_instance_uid)).first()
    if row is None:
        return None
    study_uid, study = row
    if study is None:
        return StudyOfSeries(study_uid)
    return _study_of(study)


def _study_of(study: Study) -> StudyOfSeries:
    return StudyOfSeries(study.study_instance_uid, study.patient_name, study.patient_id,
                         study.accession_number, study.study_date, study.study_description)


@dataclasses.dataclass(frozen=True)
class SeriesOfCase:
    """The slide series of a case, as the worklist lists it."""

    series_instance_uid: str
    series_description: str
    #: Time of the last instance received (seconds since the epoch).
    last_received_at: float


@dataclasses.dataclass(frozen=True)
class JobOfCase:
    """The analysis job of a series: its state (a :class:`~dicom_node.store.states.JobStateValues`
    value, read as stored), progress line and recorded result (JSON text, "" until the job is
    done)."""

    id: int
    state: str
    progress: str
    result_json: str


@dataclasses.dataclass(frozen=True)
class WorklistCase:
    """One received slide series with its study and its job (None before a job is made)."""

    series: SeriesOfCase
    study: StudyOfSeries
    job: JobOfCase | None


def worklist_cases(store: Store) -> list[WorklistCase]:
    """The received series that hold a VL Whole Slide Microscopy instance, newest first; the
    node's own result series (routing "local") are left out."""
    has_slide = exists(select(Instance.sop_instance_uid).where(
        Instance.series_instance_uid == Series.series_instance_uid,
        Instance.sop_class_uid == VL_WSM))
    with store.session() as session:
        rows = session.execute(
            select(Series, Study, Job)
            .join(Study, Study.study_instance_uid == Series.study_instance_uid)
            .outerjoin(Job, Job.series_instance_uid == Series.series_instance_uid)
            .where((Series.routing.is_(None)) | (Series.routing != SeriesRoutingValues.LOCAL))
            .where(has_slide)
            .order_by(Series.last_received_at.desc())).all()
        return [WorklistCase(
            SeriesOfCase(series.series_instance_uid, series.series_description,
                         series.last_received_at),
            _study_of(study),
            JobOfCase(job.id, job.state, job.progress, job.result_json)
            if job is not None else None)
            for series, study, job in rows]
