"""Durable storage of instances: files and index kept together (as Orthanc does).

An instance is written to a temporary file in the data directory, fsync'd,
renamed atomically to a path built only from validated UIDs, its directory
fsync'd, and only then indexed. A crash at any point leaves either nothing or
a complete file; the index never points at a partial one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from dicom_node.errors import (
    InvalidInstanceError,
    InvalidUIDError,
    SOPClassMismatchError,
    StoreFullError,
)
from dicom_node.settings import DuplicatePolicyValues, Settings
from dicom_node.store.index import (
    Base,
    Instance,
    Series,
    Study,
    create_all,
    make_engine,
    make_sessionmaker,
)
from dicom_node.store.integrity import check_pixel_data, check_structure
from dicom_node.store.states import SeriesRoutingValues

# ``Base`` (the declarative base of the node's database) and its race-safe ``create_all`` are
# exported for the tables other components keep in the same database (the viewer's accounts,
# edits and audit: viewer/models.py). Those components read the node's own tables only through
# :mod:`dicom_node.store.queries`, never through the index module.
__all__ = ["Base", "CheckedFile", "IngestResult", "Store", "create_all", "valid_uid"]

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
#: What pydicom raises on a file it cannot decode.
UNDECODABLE = (InvalidDicomError, OSError, ValueError, KeyError, AttributeError, EOFError,
               TypeError, IndexError, NotImplementedError, zlib.error, RecursionError)


def valid_uid(value: Any) -> bool:
    """True if ``value`` is a UID that may name a file: PS3.5 9.1 syntax, <= 64 chars."""
    return isinstance(value, str) and UID(value).is_valid


@dataclasses.dataclass(frozen=True)
class CheckedFile:
    """What :meth:`Store.check_file` found in a Part 10 file that passed the structural check."""

    transfer_syntax: str
    offset: int  # of the dataset, after the file meta information
    size: int
    pixel_data_length: int | None  # of native Pixel Data, if any


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What :meth:`Store.ingest_file` did with an instance."""

    sop_instance_uid: str
    series_instance_uid: str
    #: "stored", "identical" (resend, nothing changed), "kept" (different content,
    #: the first one kept) or "overwritten".
    outcome: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_dataset_bytes(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword, "")
    return ("" if value is None else str(value))[:limit]


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


class Store:
    """The instance store of one node: files under ``store_dir`` plus the index.

    Parameters
    ----------
    settings:
        The node's settings (data directory, database URL, duplicate policy).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.store_dir
        self.tmp = settings.tmp_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.effective_database_url)
        self.session = make_sessionmaker(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def clean_tmp(self) -> int:
        """Remove leftovers of writes that a crash interrupted; return how many."""
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def check_space(self, needed: int = 0) -> None:
        """Raise :class:`StoreFullError` unless ``min_free_bytes`` stay free after ``needed``
        more bytes are written."""
        free = shutil.disk_usage(self.root).free
        if free - needed < self.settings.min_free_bytes:
            raise StoreFullError(f"only {free} bytes free under {self.root} "
                                 f"(CYTONODE_MIN_FREE_BYTES {self.settings.min_free_bytes})")

    def path_of(self, instance: Instance) -> Path:
        return self.root / instance.path

    # Ingest ------------------------------------------------------------------
    def check_file(self, path: Path) -> CheckedFile:
        """The structural check of a Part 10 file, before pydicom reads it (pydicom reads damaged
        data tolerantly, recurses without bound and inflates deflated data whole).

        Raises
        ------
        InvalidInstanceError
            The file meta cannot be decoded, or the dataset is damaged or inflates beyond
            ``settings.max_inflated_bytes``.
        """
        try:
            meta = read_file_meta_info(path)
            meta_end = meta.get("FileMetaInformationGroupLength")
            tsyntax = str(meta.TransferSyntaxUID)
        except UNDECODABLE as exc:
            raise InvalidInstanceError(f"cannot decode the file meta information: {exc}") from exc
        offset = 132 + 12 + int(meta_end or 0)
        with open(path, "rb") as fp:
            file_size = os.fstat(fp.fileno()).st_size
            pixel_data_length = check_structure(
                fp, offset, file_size, tsyntax, max_inflated=self.settings.max_inflated_bytes)
        return CheckedFile(tsyntax, offset, file_size, pixel_data_length)

    def ingest_file(self, path: Path, *, calling_ae: str = "", expected_sop_class: str | None = None,
                    expected_sop_instance: str | None = None, move: bool = False,
                    routing: str | None = None, checked: CheckedFile | None = None) -> IngestResult:
        """Store a DICOM file (with file meta) durably and index it.

        Parameters
        ----------
        path:
            A Part 10 file. With ``move=True`` it is renamed into the store
            (it must lie on the same file system as the data directory).
        calling_ae:
            AE title of the sender, recorded in the index.
        expected_sop_class, expected_sop_instance:
            The UIDs of the C-STORE request; the dataset must carry the same.
        routing:
            Initial routing state of a new series (:attr:`SeriesRoutingValues.LOCAL` for series
            the node made).
        checked:
            What :meth:`check_file` returned for ``path``, if the caller already checked it.

        Raises
        ------
        InvalidInstanceError
            The file cannot be decoded or lacks valid UIDs.
        SOPClassMismatchError
            The dataset's SOP Class UID differs from ``expected_sop_class``.
        StoreFullError
            The file system is full.
        """
        checked = checked or self.check_file(path)
        tsyntax, offset, file_size = checked.transfer_syntax, checked.offset, checked.size
        try:
            ds = dcmread(path, stop_before_pixels=True, defer_size="256 KB")
            _ = ds.get("Modality"), ds.get("ImageType")  # forces decoding of the header
        except UNDECODABLE as exc:
            raise InvalidInstanceError(f"cannot decode dataset: {exc}") from exc
        check_pixel_data(ds, checked.pixel_data_length)
        sop_uid, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
        study_uid, series_uid = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        for name, value in (("SOPInstanceUID", sop_uid), ("SOPClassUID", sop_class),
                            ("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
            if not valid_uid(value):
                raise InvalidUIDError(f"{name} {value!r} is missing or not a valid UID")
        sop_uid, sop_class = str(sop_uid), str(sop_class)
        study_uid, series_uid = str(study_uid), str(series_uid)
        if expected_sop_instance is not None and sop_uid != expected_sop_instance:
            raise InvalidUIDError(
                f"dataset SOPInstanceUID {sop_uid} differs from the request's {expected_sop_instance}")
        if expected_sop_class is not None and sop_class != expected_sop_class:
            raise SOPClassMismatchError(
                f"dataset SOPClassUID {sop_class} differs from the request's {expected_sop_class}")
        size = file_size - offset
        digest = ""  # computed only when the instance arrives again (it costs ~10% of ingest)
        rel = f"{study_uid}/{series_uid}/{sop_uid}.dcm"

        with self.session() as session:
            existing = session.get(Instance, sop_uid)
            if existing is not None:
                digest = _hash_dataset_bytes(path, offset)
                if not existing.sha256 and existing.size == size:
                    stored = self.root / existing.path
                    stored_meta = dcmread(stored, stop_before_pixels=True).file_meta
                    existing.sha256 = _hash_dataset_bytes(
                        stored, 132 + 12 + int(stored_meta.FileMetaInformationGroupLength))
                if existing.sha256 == digest:
                    log.info("identical resend of %s from %r: nothing to do", sop_uid, calling_ae)
                    self._touch_series(session, series_uid)
                    session.commit()
                    return IngestResult(sop_uid, series_uid, "identical")
                if self.settings.duplicate_policy is DuplicatePolicyValues.KEEP:
                    log.warning("%s arrived again from %r with different content; "
                                "keeping the first (duplicate_policy=keep)", sop_uid, calling_ae)
                    return IngestResult(sop_uid, series_uid, "kept")
                log.warning("%s arrived again from %r with different content; "
                            "overwriting (duplicate_policy=overwrite)", sop_uid, calling_ae)

        self._place(path, self.root / rel, move=move)
        now = time.time()
        with self.session() as session:
            study = session.get(Study, study_uid)
            if study is None:
                session.add(Study(
                    study_instance_uid=study_uid, patient_id=_text(ds, "PatientID", 64),
                    patient_name=_text(ds, "PatientName", 324), study_date=_text(ds, "StudyDate", 8),
                    accession_number=_text(ds, "AccessionNumber", 16),
                    study_description=_text(ds, "StudyDescription", 64),
                    patient_birth_date=_text(ds, "PatientBirthDate", 8),
                    patient_sex=_text(ds, "PatientSex", 16), study_time=_text(ds, "StudyTime", 16),
                    study_id=_text(ds, "StudyID", 16),
                    referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
                    created_at=now))
                session.flush()
            series = session.get(Series, series_uid)
            if series is None:
                session.add(Series(
                    series_instance_uid=series_uid, study_instance_uid=study_uid,
                    modality=_text(ds, "Modality", 16),
                    series_description=_text(ds, "SeriesDescription", 64),
                    series_number=_text(ds, "SeriesNumber", 12), last_received_at=now,
                    routing=routing))
                session.flush()
            else:
                if series.routing not in (None, SeriesRoutingValues.LOCAL):
                    log.warning("%s arrived after series %s was routed (%s); it is stored but "
                                "does not start another job", sop_uid, series_uid, series.routing)
                series.last_received_at = now
            image_type = ds.get("ImageType")
            fields = dict(
                series_instance_uid=series_uid, sop_class_uid=sop_class,
                transfer_syntax_uid=tsyntax,
                image_type="\\".join(str(v) for v in image_type) if image_type else "",
                number_of_frames=int(ds.get("NumberOfFrames") or 1),
                instance_number=_int_or_none(ds.get("InstanceNumber")), path=rel, size=size,
                sha256=digest, calling_ae=calling_ae, received_at=now)
            instance = session.get(Instance, sop_uid)
            if instance is None:
                session.add(Instance(sop_instance_uid=sop_uid, **fields))
                outcome = "stored"
            else:
                for key, value in fields.items():
                    setattr(instance, key, value)
                outcome = "overwritten"
            session.commit()
        return IngestResult(sop_uid, series_uid, outcome)

    def _touch_series(self, session: Any, series_uid: str) -> None:
        series = session.get(Series, series_uid)
        if series is not None and series.routing is None:
            series.last_received_at = time.time()

    def _place(self, source: Path, target: Path, *, move: bool) -> None:
        """Durably put ``source`` at ``target``: fsync, atomic rename, fsync the directory."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:
                fd = os.open(source, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(source, target)
            else:
                with tempfile.NamedTemporaryFile(dir=self.tmp, suffix=".part", delete=False) as out, \
                        open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(out.name, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StoreFullError(f"no space left to store {target.name}: {exc}") from exc
            raise

    def add_dataset(self, ds: Dataset) -> IngestResult:
        """Store an instance the node created itself (Part 10 encoded) and index it."""
        self.check_space()
        with tempfile.NamedTemporaryFile(dir=self.tmp, suffix=".dcm", delete=False) as out:
            name = out.name
        try:
            ds.save_as(name, enforce_file_format=True)
            return self.ingest_file(Path(name), move=True, routing=SeriesRoutingValues.LOCAL)
        finally:
            Path(name).unlink(missing_ok=True)

