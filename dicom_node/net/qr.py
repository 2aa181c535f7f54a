"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET over the index and the store (PS3.4 Annex C).

Matching runs as SQLAlchemy expressions over the index (never SQL built from strings); the
instances to send are read from the store's files, exactly as stored. QIDO-RS
(:mod:`dicom_node.net.dicomweb`) uses the same matching through :func:`find`.

Supported (PS3.4 C.2.2.2): single value, universal (empty or ``*``), wildcard (``*`` and ``?``),
range (DA, TM, DT: ``A-B``, ``A-``, ``-B``) and list of UID matching on the keys in
:data:`MATCH_KEYS`. Other requested keys are returned with the value of the stored object (read
from one instance's header) and are not used for matching, as PS3.4 C.4.1.2.2 allows.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pynetdicom import evt
from pynetdicom.presentation import build_context
from sqlalchemy import ColumnElement, and_, distinct, exists, func, or_, select

from dicom_node.net.tls import client_tls_args
from dicom_node.settings import Destination, Settings
from dicom_node.status import QueryRetrieveStatusValues
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, Series, Study

log = logging.getLogger(__name__)


class QueryLevelValues(str, enum.Enum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryModelValues(str, enum.Enum):
    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"


#: Q/R information models (PS3.4 C.6), SOP class UID -> (model, operation).
QR_SOP_CLASSES: dict[str, str] = {
    "PatientRootQueryRetrieveInformationModelFind": "1.2.840.10008.5.1.4.1.2.1.1",
    "PatientRootQueryRetrieveInformationModelMove": "1.2.840.10008.5.1.4.1.2.1.2",
    "PatientRootQueryRetrieveInformationModelGet": "1.2.840.10008.5.1.4.1.2.1.3",
    "StudyRootQueryRetrieveInformationModelFind": "1.2.840.10008.5.1.4.1.2.2.1",
    "StudyRootQueryRetrieveInformationModelMove": "1.2.840.10008.5.1.4.1.2.2.2",
    "StudyRootQueryRetrieveInformationModelGet": "1.2.840.10008.5.1.4.1.2.2.3",
}
_MODEL_OF_UID = {uid: (QueryModelValues.PATIENT_ROOT if name.startswith("Patient")
                       else QueryModelValues.STUDY_ROOT) for name, uid in QR_SOP_CLASSES.items()}


class QueryError(ValueError):
    """A query identifier that cannot be processed; ``status`` is the DIMSE status to answer."""

    def __init__(self, message: str, status: QueryRetrieveStatusValues) -> None:
        super().__init__(message)
        self.status = status


#: Matching keys: DICOM keyword -> (level, index column). Keys at a level below the query
#: level are ignored (hierarchical model, PS3.4 C.4.1.2.2.1).
MATCH_KEYS: dict[str, tuple[QueryLevelValues, Any]] = {
    "PatientID": (QueryLevelValues.PATIENT, Study.patient_id),
    "PatientName": (QueryLevelValues.PATIENT, Study.patient_name),
    "PatientBirthDate": (QueryLevelValues.PATIENT, Study.patient_birth_date),
    "PatientSex": (QueryLevelValues.PATIENT, Study.patient_sex),
    "StudyInstanceUID": (QueryLevelValues.STUDY, Study.study_instance_uid),
    "StudyDate": (QueryLevelValues.STUDY, Study.study_date),
    "StudyTime": (QueryLevelValues.STUDY, Study.study_time),
    "AccessionNumber": (QueryLevelValues.STUDY, Study.accession_number),
    "StudyID": (QueryLevelValues.STUDY, Study.study_id),
    "StudyDescription": (QueryLevelValues.STUDY, Study.study_description),
    "ReferringPhysicianName": (QueryLevelValues.STUDY, Study.referring_physician_name),
    "SeriesInstanceUID": (QueryLevelValues.SERIES, Series.series_instance_uid),
    "Modality": (QueryLevelValues.SERIES, Series.modality),
    "SeriesNumber": (QueryLevelValues.SERIES, Series.series_number),
    "SeriesDescription": (QueryLevelValues.SERIES, Series.series_description),
    "SOPInstanceUID": (QueryLevelValues.IMAGE, Instance.sop_instance_uid),
    "SOPClassUID": (QueryLevelValues.IMAGE, Instance.sop_class_uid),
    "InstanceNumber": (QueryLevelValues.IMAGE, Instance.instance_number),
}
_ORDER = [QueryLevelValues.PATIENT, QueryLevelValues.STUDY, QueryLevelValues.SERIES,
          QueryLevelValues.IMAGE]
#: Attributes that never come from an instance header (they describe the query or the node).
_COMPUTED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
             "InstanceAvailability", "ModalitiesInStudy", "SOPClassesInStudy",
             "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
             "NumberOfPatientRelatedInstances", "NumberOfStudyRelatedSeries",
             "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
             "NumberOfFrames", "TransferSyntaxUID"}
_BULK_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
_RANGE_VRS = {"DA", "TM", "DT"}
_RANGE_RE = re.compile(r"^[0-9.+\-:]*$")


@dataclasses.dataclass(frozen=True)
class Match:
    """One matching entity: the index rows along its path (those above the level are set)."""

    level: QueryLevelValues
    study: Study
    series: Series | None = None
    instance: Instance | None = None


def keyword_vr(keyword: str) -> str:
    """The dictionary VR of a DICOM keyword (callers pass known keywords only)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return str(dictionary_VR(tag))


def _like_pattern(value: str) -> str:
    """Translate DICOM wildcards (``*``, ``?``) to a LIKE pattern, escaping ``%``, ``_``, ``\\``."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def match_condition(keyword: str, column: Any, value: str) -> ColumnElement[bool] | None:
    """The SQL condition for one matching key (PS3.4 C.2.2.2), or None for universal matching.

    Raises
    ------
    QueryError
        The value is malformed for its VR (UNABLE_TO_PROCESS).
    """
    vr = keyword_vr(keyword)
    value = value.strip() if vr != "PN" else value.strip().rstrip("^= ")
    if value in ("", "*"):
        return None
    if keyword == "InstanceNumber":
        try:
            return column.in_([int(v) for v in value.split("\\")])  # type: ignore[no-any-return]
        except ValueError as exc:
            raise QueryError(f"InstanceNumber {value!r} is not an integer list",
                             QueryRetrieveStatusValues.UNABLE_TO_PROCESS) from exc
    if vr == "UI":  # C.2.2.2.2: list of UID matching; wildcards are not allowed
        uids = [v.strip() for v in value.split("\\") if v.strip()]
        if any(not re.fullmatch(r"[0-9.]{1,64}", u) for u in uids):
            raise QueryError(f"{keyword} {value!r} is not a UID list",
                             QueryRetrieveStatusValues.UNABLE_TO_PROCESS)
        return column.in_(uids)  # type: ignore[no-any-return]
    if vr in _RANGE_VRS and ("-" in value and vr != "DT" or value.count("-") == 1):
        if not _RANGE_RE.match(value) or value.count("-") != 1:
            raise QueryError(f"{keyword} {value!r} is not a range",
                             QueryRetrieveStatusValues.UNABLE_TO_PROCESS)
        low, high = (v.replace(".", "") if vr == "DA" else v for v in value.split("-"))
        conds = [column != ""]
        if low:
            conds.append(column >= low)
        if high:
            # a time or datetime range includes every value starting with the upper bound
            conds.append(column <= high if vr == "DA" else column < high + "\x7f")
        return and_(*conds)
    if vr in _RANGE_VRS:
        if not _RANGE_RE.match(value):
            raise QueryError(f"{keyword} {value!r} is not a {vr} value",
                             QueryRetrieveStatusValues.UNABLE_TO_PROCESS)
        value = value.replace(".", "") if vr == "DA" else value
        return column.like(_like_pattern(value) + ("%" if vr != "DA" else ""),  # type: ignore[no-any-return]
                           escape="\\")
    values = [v for v in value.split("\\")] if vr in ("CS",) else [value]
    conds = []
    for v in values:
        if "*" in v or "?" in v:
            pattern = _like_pattern(v)
            conds.append(column.ilike(pattern, escape="\\") if vr == "PN"
                         else column.like(pattern, escape="\\"))
        elif vr == "PN":  # PN matching is case-insensitive here (C.2.2.2.1 leaves it open)
            conds.append(func.lower(column) == v.lower())
        else:
            conds.append(column == v)
    return or_(*conds) if len(conds) > 1 else conds[0]


def _text(identifier: Dataset, keyword: str) -> str:
    elem = identifier.get(keyword)
    if elem is None or elem == "" or (hasattr(elem, "__len__") and not isinstance(elem, str)
                                      and len(elem) == 0):
        return ""
    if isinstance(elem, (list, tuple)) or type(elem).__name__ == "MultiValue":
        return "\\".join(str(v) for v in elem)
    return str(elem)


def parse_level(identifier: Dataset, model: QueryModelValues) -> QueryLevelValues:
    """The Query/Retrieve Level of ``identifier``, checked against the information model."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = QueryLevelValues(raw)
    except ValueError as exc:
        raise QueryError(f"QueryRetrieveLevel {raw!r} is missing or unknown",
                         QueryRetrieveStatusValues.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) from exc
    if level is QueryLevelValues.PATIENT and model is QueryModelValues.STUDY_ROOT:
        raise QueryError("QueryRetrieveLevel PATIENT is not part of the Study Root model",
                         QueryRetrieveStatusValues.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    return level


def find(store: Store, level: QueryLevelValues, keys: dict[str, str], *,
         limit: int | None = None, offset: int = 0) -> list[Match]:
    """Entities at ``level`` matching ``keys`` (keyword -> DICOM string value).

    Keys that are not in :data:`MATCH_KEYS` or lie below ``level`` are ignored. For
    ``PATIENT`` one :class:`Match` per Patient ID is returned (its most recent study).

    Raises
    ------
    QueryError
        A matching value is malformed.
    """
    depth = _ORDER.index(level)
    conds: list[ColumnElement[bool]] = []
    for keyword, value in keys.items():
        entry = MATCH_KEYS.get(keyword)
        if entry is None or _ORDER.index(entry[0]) > depth:
            continue
        cond = match_condition(keyword, entry[1], value)
        if cond is not None:
            conds.append(cond)
    modalities = keys.get("ModalitiesInStudy", "").strip()
    if modalities and modalities != "*" and depth <= 1:
        names = [m for m in modalities.split("\\") if m]
        conds.append(exists().where(Series.study_instance_uid == Study.study_instance_uid,
                                    Series.modality.in_(names)))
    if level in (QueryLevelValues.PATIENT, QueryLevelValues.STUDY):
        stmt: Any = select(Study)
        if any(MATCH_KEYS[k][0] in (QueryLevelValues.SERIES, QueryLevelValues.IMAGE)
               for k in keys if k in MATCH_KEYS and _ORDER.index(MATCH_KEYS[k][0]) <= depth):
            stmt = stmt.join(Series)  # pragma: no cover (not reachable: lower keys are dropped)
        stmt = stmt.where(*conds).order_by(Study.study_date, Study.study_instance_uid)
    elif level is QueryLevelValues.SERIES:
        stmt = select(Series, Study).join(Study, Series.study_instance_uid == Study.study_instance_uid)
        stmt = stmt.where(*conds).order_by(Study.study_instance_uid, Series.series_number,
                                           Series.series_instance_uid)
    else:
        stmt = (select(Instance, Series, Study)
                .join(Series, Instance.series_instance_uid == Series.series_instance_uid)
                .join(Study, Series.study_instance_uid == Study.study_instance_uid))
        stmt = stmt.where(*conds).order_by(Series.series_instance_uid, Instance.instance_number,
                                           Instance.sop_instance_uid)
    with store.session() as session:
        if level is QueryLevelValues.PATIENT:
            seen: dict[str, Study] = {}
            for study in session.scalars(stmt):
                seen[study.patient_id] = study
            matches = [Match(level, s) for s in seen.values()]
            return matches[offset:offset + limit if limit is not None else None]
        if offset:
            stmt = stmt.offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        if level is QueryLevelValues.STUDY:
            return [Match(level, s) for s in session.scalars(stmt)]
        if level is QueryLevelValues.SERIES:
            return [Match(level, st, se) for se, st in session.execute(stmt)]
        return [Match(level, st, se, inst) for inst, se, st in session.execute(stmt)]


def instances_of(store: Store, matches: Iterable[Match]) -> list[Instance]:
    """Every stored instance below the matched entities, without duplicates, in a stable order."""
    by_level: dict[QueryLevelValues, set[str]] = {}
    for m in matches:
        if m.level is QueryLevelValues.IMAGE and m.instance is not None:
            by_level.setdefault(m.level, set()).add(m.instance.sop_instance_uid)
        elif m.level is QueryLevelValues.SERIES and m.series is not None:
            by_level.setdefault(m.level, set()).add(m.series.series_instance_uid)
        else:
            by_level.setdefault(QueryLevelValues.STUDY, set()).add(m.study.study_instance_uid)
    conds = []
    if QueryLevelValues.IMAGE in by_level:
        conds.append(Instance.sop_instance_uid.in_(sorted(by_level[QueryLevelValues.IMAGE])))
    if QueryLevelValues.SERIES in by_level:
        conds.append(Instance.series_instance_uid.in_(sorted(by_level[QueryLevelValues.SERIES])))
    if QueryLevelValues.STUDY in by_level:
        conds.append(Instance.series_instance_uid.in_(
            select(Series.series_instance_uid).where(
                Series.study_instance_uid.in_(sorted(by_level[QueryLevelValues.STUDY])))))
    if not conds:
        return []
    with store.session() as session:
        stmt = (select(Instance).where(or_(*conds))
                .order_by(Instance.series_instance_uid, Instance.instance_number,
                          Instance.sop_instance_uid))
        return list(session.scalars(stmt))


def _counts(store: Store, match: Match, wanted: set[str]) -> dict[str, Any]:
    """Values of the computed attributes (related counts, modalities) that were asked for."""
    out: dict[str, Any] = {}
    study_uid = match.study.study_instance_uid
    with store.session() as session:
        if wanted & {"NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                     "NumberOfPatientRelatedInstances"}:
            pid = match.study.patient_id
            out["NumberOfPatientRelatedStudies"] = session.scalar(
                select(func.count()).select_from(Study).where(Study.patient_id == pid))
            out["NumberOfPatientRelatedSeries"] = session.scalar(
                select(func.count()).select_from(Series).join(Study).where(Study.patient_id == pid))
            out["NumberOfPatientRelatedInstances"] = session.scalar(
                select(func.count()).select_from(Instance).join(Series).join(Study)
                .where(Study.patient_id == pid))
        if wanted & {"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                     "ModalitiesInStudy", "SOPClassesInStudy"}:
            out["NumberOfStudyRelatedSeries"] = session.scalar(
                select(func.count()).select_from(Series).where(Series.study_instance_uid == study_uid))
            out["NumberOfStudyRelatedInstances"] = session.scalar(
                select(func.count()).select_from(Instance).join(Series)
                .where(Series.study_instance_uid == study_uid))
            out["ModalitiesInStudy"] = sorted(m for m in session.scalars(
                select(distinct(Series.modality)).where(Series.study_instance_uid == study_uid)) if m)
            out["SOPClassesInStudy"] = sorted(session.scalars(
                select(distinct(Instance.sop_class_uid)).join(Series)
                .where(Series.study_instance_uid == study_uid)))
        if match.series is not None and "NumberOfSeriesRelatedInstances" in wanted:
            out["NumberOfSeriesRelatedInstances"] = session.scalar(
                select(func.count()).select_from(Instance)
                .where(Instance.series_instance_uid == match.series.series_instance_uid))
    return out


def first_instance(store: Store, match: Match) -> Instance | None:
    """The instance whose header supplies non-indexed attributes of ``match``."""
    if match.instance is not None:
        return match.instance
    with store.session() as session:
        stmt = select(Instance).join(Series)
        if match.series is not None:
            stmt = stmt.where(Instance.series_instance_uid == match.series.series_instance_uid)
        elif match.level is QueryLevelValues.PATIENT:
            stmt = stmt.join(Study).where(Study.patient_id == match.study.patient_id)
        else:
            stmt = stmt.where(Series.study_instance_uid == match.study.study_instance_uid)
        first: Instance | None = session.scalars(stmt.order_by(Instance.received_at).limit(1)).first()
        return first


def indexed_values(match: Match) -> dict[str, Any]:
    """The attributes of ``match`` known from the index, keyword -> value."""
    st = match.study
    values: dict[str, Any] = {
        "PatientID": st.patient_id, "PatientName": st.patient_name,
        "PatientBirthDate": st.patient_birth_date, "PatientSex": st.patient_sex,
    }
    if match.level is QueryLevelValues.PATIENT:
        return values
    values.update({
        "StudyInstanceUID": st.study_instance_uid, "StudyDate": st.study_date,
        "StudyTime": st.study_time, "AccessionNumber": st.accession_number, "StudyID": st.study_id,
        "StudyDescription": st.study_description,
        "ReferringPhysicianName": st.referring_physician_name,
    })
    if match.series is not None:
        se = match.series
        values.update({"SeriesInstanceUID": se.series_instance_uid, "Modality": se.modality,
                       "SeriesNumber": se.series_number or None,
                       "SeriesDescription": se.series_description})
    if match.instance is not None:
        inst = match.instance
        values.update({"SOPInstanceUID": inst.sop_instance_uid, "SOPClassUID": inst.sop_class_uid,
                       "InstanceNumber": inst.instance_number,
                       "NumberOfFrames": inst.number_of_frames,
                       "TransferSyntaxUID": inst.transfer_syntax_uid})
    return values


def _requested_keywords(identifier: Dataset) -> list[str]:
    out = []
    for elem in identifier:
        if elem.tag.group == 0x0002 or elem.tag.is_private:
            continue
        kw = elem.keyword or keyword_for_tag(elem.tag)
        if kw:
            out.append(kw)
    return out


def response_identifier(store: Store, match: Match, requested: list[str], ae_title: str,
                        level: QueryLevelValues) -> Dataset:
    """The C-FIND response identifier for one match (PS3.4 C.4.1.2.2.2): every requested key."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    values = indexed_values(match)
    wanted = set(requested)
    values.update(_counts(store, match, wanted))
    values["RetrieveAETitle"] = ae_title
    values["InstanceAvailability"] = "ONLINE"
    header: Dataset | None = None
    if any(k not in values and k not in _COMPUTED for k in requested):
        inst = first_instance(store, match)
        if inst is not None:
            try:
                header = dcmread(store.path_of(inst), stop_before_pixels=True, defer_size="64 KB")
            except (OSError, ValueError) as exc:  # a file the store cannot read: report, go on
                log.error("cannot read %s for a query response: %s", inst.path, exc)
    depth = _ORDER.index(level)
    for kw in requested:
        if kw in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        vr = keyword_vr(kw)
        below = kw in MATCH_KEYS and _ORDER.index(MATCH_KEYS[kw][0]) > depth
        if below:  # a key of a lower level (not allowed in a hierarchical query): empty
            setattr(ds, kw, None)
        elif kw in values:
            value = values[kw]
            setattr(ds, kw, value if value not in (None, "") else None)
        elif header is not None and kw in header and vr not in _BULK_VRS:
            ds[kw] = header[kw]
        else:
            setattr(ds, kw, [] if vr == "SQ" else None)
    ds.QueryRetrieveLevel = level.value
    return ds


# DIMSE handlers ------------------------------------------------------------------------------
def _decode(event: evt.Event) -> tuple[Dataset, QueryModelValues]:
    try:
        identifier = event.identifier
        _ = list(identifier)  # decode every element now, inside the error handling
    except Exception as exc:  # the DIMSE edge: an undecodable identifier
        raise QueryError(f"cannot decode identifier: {exc}",
                         QueryRetrieveStatusValues.UNABLE_TO_PROCESS) from exc
    model = _MODEL_OF_UID.get(str(event.request.AffectedSOPClassUID),
                              QueryModelValues.STUDY_ROOT)
    return identifier, model


def _query_keys(identifier: Dataset) -> dict[str, str]:
    return {kw: _text(identifier, kw) for kw in _requested_keywords(identifier)
            if kw in MATCH_KEYS or kw == "ModalitiesInStudy"}


def handle_find(event: evt.Event, store: Store, settings: Settings) -> Iterator[tuple[int, Any]]:
    """C-FIND SCP (PS3.4 C.4.1): yields one pending response per match, then success."""
    calling = event.assoc.requestor.ae_title.strip()
    try:
        identifier, model = _decode(event)
        level = parse_level(identifier, model)
        matches = find(store, level, _query_keys(identifier))
    except QueryError as exc:
        log.warning("C-FIND from %s refused: %s", calling, exc)
        yield int(exc.status), None
        return
    except Exception:  # the DIMSE edge: an index failure
        log.exception("C-FIND from %s failed", calling)
        yield int(QueryRetrieveStatusValues.UNABLE_TO_PROCESS), None
        return
    log.info("C-FIND %s %s from %s: %d matches", model.value, level.value, calling, len(matches))
    requested = _requested_keywords(identifier)
    for match in matches:
        if event.is_cancelled:
            yield int(QueryRetrieveStatusValues.CANCEL), None
            return
        yield int(QueryRetrieveStatusValues.PENDING), response_identifier(
            store, match, requested, settings.ae_title, level)


def _retrieve_instances(event: evt.Event, store: Store) -> list[Instance]:
    identifier, model = _decode(event)
    level = parse_level(identifier, model)
    keys = _query_keys(identifier)
    # PS3.4 C.4.2.2.1: a retrieve names the unique key(s) of its level; anything else is a
    # request to move everything, which we refuse rather than send the whole store.
    unique = {QueryLevelValues.PATIENT: "PatientID", QueryLevelValues.STUDY: "StudyInstanceUID",
              QueryLevelValues.SERIES: "SeriesInstanceUID",
              QueryLevelValues.IMAGE: "SOPInstanceUID"}[level]
    if not keys.get(unique, "").strip() or "*" in keys[unique] or "?" in keys[unique]:
        raise QueryError(f"a {level.value} retrieve needs {unique}",
                         QueryRetrieveStatusValues.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    return instances_of(store, find(store, level, keys))


def _load(store: Store, inst: Instance) -> Dataset | None:
    try:
        return dcmread(store.path_of(inst))
    except (OSError, ValueError) as exc:
        log.error("cannot read stored %s (%s): %s", inst.sop_instance_uid, inst.path, exc)
        return None


def _failed(uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return ds


def _send_all(event: evt.Event, store: Store,
              instances: list[Instance]) -> Iterator[tuple[int, Any]]:
    unreadable: list[str] = []
    for inst in instances:
        if event.is_cancelled:
            yield int(QueryRetrieveStatusValues.CANCEL), None
            return
        ds = _load(store, inst)
        if ds is None:
            unreadable.append(inst.sop_instance_uid)
            continue
        yield int(QueryRetrieveStatusValues.PENDING), ds
    if unreadable:
        yield int(QueryRetrieveStatusValues.SUBOPERATIONS_WARNING), _failed(unreadable)


def handle_get(event: evt.Event, store: Store) -> Iterator[Any]:
    """C-GET SCP (PS3.4 C.4.3): C-STORE sub-operations on the same association."""
    calling = event.assoc.requestor.ae_title.strip()
    try:
        instances = _retrieve_instances(event, store)
    except QueryError as exc:
        log.warning("C-GET from %s refused: %s", calling, exc)
        yield 1  # with 0 sub-operations announced pynetdicom would answer success
        yield int(exc.status), None
        return
    except Exception:  # the DIMSE edge
        log.exception("C-GET from %s failed", calling)
        yield 1
        yield int(QueryRetrieveStatusValues.UNABLE_TO_PROCESS), None
        return
    log.info("C-GET from %s: %d instances", calling, len(instances))
    yield len(instances)
    yield from _send_all(event, store, instances)


def move_destination(settings: Settings, ae_title: str) -> Destination | None:
    """The configured peer with this AE title (move destinations first), or None."""
    for dest in (*settings.move_destinations, *settings.destinations):
        if dest.ae_title == ae_title:
            return dest
    return None


def _move_contexts(instances: list[Instance]) -> list[Any]:
    """One requested context per (SOP class, stored transfer syntax); at most 128 (PS3.8 9.3.2.2)."""
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    contexts = []
    for sop_class, syntax in pairs[:128]:
        syntaxes = [syntax]
        if syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
        contexts.append(build_context(sop_class, syntaxes))
    if not contexts:  # nothing to send: still associate, with Verification
        contexts.append(build_context("1.2.840.10008.1.1"))
    return contexts


def _move_association(settings: Settings, dest: Destination, instances: list[Instance]
                      ) -> tuple[str, int, dict[str, Any]]:
    """What a C-MOVE handler yields first: where to send, with the contexts and TLS to use."""
    return dest.host, dest.port, {"contexts": _move_contexts(instances),
                                  "tls_args": client_tls_args(settings, dest)}


def handle_move(event: evt.Event, store: Store, settings: Settings) -> Iterator[Any]:
    """C-MOVE SCP (PS3.4 C.4.2): C-STORE sub-operations to a configured AE only."""
    calling = event.assoc.requestor.ae_title.strip()
    destination_ae = str(event.move_destination).strip()
    dest = move_destination(settings, destination_ae)
    if dest is None:
        log.warning("C-MOVE from %s to unknown destination %r refused", calling, destination_ae)
        yield None, None  # pynetdicom answers MOVE_DESTINATION_UNKNOWN (0xA801)
        return
    try:
        instances = _retrieve_instances(event, store)
    except QueryError as exc:
        # pynetdicom answers success when 0 sub-operations are announced, so announce one and
        # fail it with the identifier's status (it associates with the destination first).
        log.warning("C-MOVE from %s refused: %s", calling, exc)
        yield _move_association(settings, dest, [])
        yield 1
        yield int(exc.status), None
        return
    except Exception:  # the DIMSE edge
        log.exception("C-MOVE from %s failed", calling)
        yield _move_association(settings, dest, [])
        yield 1
        yield int(QueryRetrieveStatusValues.UNABLE_TO_PROCESS), None
        return
    if len({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances}) > 128:
        log.warning("C-MOVE from %s: more than 128 contexts needed; some sub-operations will fail",
                    calling)
    log.info("C-MOVE from %s to %s: %d instances", calling, dest, len(instances))
    yield _move_association(settings, dest, instances)
    yield len(instances)
    yield from _send_all(event, store, instances)


def qr_handlers(store: Store, settings: Settings) -> list[Any]:
    """The ``evt_handlers`` entries of the Q/R SCP."""
    return [(evt.EVT_C_FIND, handle_find, [store, settings]),
            (evt.EVT_C_GET, handle_get, [store]),
            (evt.EVT_C_MOVE, handle_move, [store, settings])]


def read_stored(store: Store, inst: Instance) -> Path:
    """Path of a stored instance's file (built by the store from checked UIDs)."""
    return store.path_of(inst)
