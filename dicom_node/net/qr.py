"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET over the index and the store (PS3.4 Annex C).

The matching is the store's (:mod:`dicom_node.store.matching`, shared with QIDO-RS); the
instances to send are read from the store's files, exactly as stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pynetdicom import evt
from pynetdicom.presentation import build_context

from dicom_node.net.tls import client_tls_args
from dicom_node.settings import Destination, Settings
from dicom_node.status import QueryRetrieveStatusValues
from dicom_node.store.files import Store
from dicom_node.store.index import Instance
from dicom_node.store.matching import (
    MATCH_KEYS,
    QueryError,
    QueryLevelValues,
    QueryModelValues,
    find,
    instances_of,
    parse_level,
    requested_keywords,
    response_identifier,
    text_of,
)

log = logging.getLogger(__name__)


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
    return {kw: text_of(identifier, kw) for kw in requested_keywords(identifier)
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
    requested = requested_keywords(identifier)
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
