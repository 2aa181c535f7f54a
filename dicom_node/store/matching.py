"""Query/Retrieve matching over the index (PS3.4 C.2.2.2), shared by the Q/R SCP
(:mod:`dicom_node.net.qr`) and QIDO-RS (:mod:`dicom_node.net.dicomweb`).

Matching runs as SQLAlchemy expressions over the index (never SQL built from strings).
Supported: single value, universal (empty or ``*``), wildcard (``*`` and ``?``), range (DA, TM,
DT: ``A-B``, ``A-``, ``-B``) and list of UID matching on the keys in :data:`MATCH_KEYS`. Other
requested keys are returned with the value of the stored object (read from one instance's
header) and are not used for matching, as PS3.4 C.4.1.2.2 allows.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from collections.abc import Iterable
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, and_, distinct, exists, func, or_, select

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


def text_of(identifier: Dataset, keyword: str) -> str:
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


def requested_keywords(identifier: Dataset) -> list[str]:
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
