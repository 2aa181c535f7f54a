"""DIMSE event handlers. The only place in the node that catches broad exceptions.

Handlers run on the association's thread: they store and index, nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pynetdicom import evt

from dicom_node.errors import (
    InvalidInstanceError,
    InvalidUIDError,
    SOPClassMismatchError,
    StoreFullError,
)
from dicom_node.net.receive import data_set_refusal
from dicom_node.status import StatusValues
from dicom_node.store.files import Store

log = logging.getLogger(__name__)


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always success while the node runs."""
    return int(StatusValues.SUCCESS)


def handle_store(event: evt.Event, store: Store) -> int:
    """C-STORE: move the received file into the store, index it, return a status.

    Success is returned only after the file is fsync'd, renamed into place and
    indexed (PS3.4 B.2.3 statuses; see :mod:`dicom_node.status`).
    """
    req: Any = event.request
    sop_uid = str(req.AffectedSOPInstanceUID)
    calling = event.assoc.requestor.ae_title.strip()
    refusal = data_set_refusal(req)
    if refusal is not None:  # dropped as it arrived (dicom_node.net.receive.ReceivedDataSetFile)
        log.error("out of resources storing %s from %s: %s", sop_uid, calling, refusal)
        return int(StatusValues.OUT_OF_RESOURCES)
    try:
        store.check_space()
        result = store.ingest_file(
            Path(event.dataset_path), calling_ae=calling,
            expected_sop_class=str(req.AffectedSOPClassUID),
            expected_sop_instance=sop_uid, move=True)
    except StoreFullError as exc:
        log.error("out of resources storing %s from %s: %s", sop_uid, calling, exc)
        return int(StatusValues.OUT_OF_RESOURCES)
    except SOPClassMismatchError as exc:
        log.error("refused %s from %s: %s", sop_uid, calling, exc)
        return int(StatusValues.SOP_CLASS_MISMATCH)
    except InvalidUIDError as exc:
        log.error("refused %s from %s: %s", sop_uid, calling, exc)
        return int(StatusValues.INVALID_UIDS)
    except InvalidInstanceError as exc:
        log.error("refused %s from %s: %s", sop_uid, calling, exc)
        return int(StatusValues.CANNOT_UNDERSTAND)
    except Exception:  # the DIMSE edge: never let pynetdicom answer 0xC211 blindly
        log.exception("failed to store %s from %s", sop_uid, calling)
        return int(StatusValues.PROCESSING_FAILURE)
    log.info("stored %s (%s) from %s", sop_uid, result.outcome, calling)
    return int(StatusValues.SUCCESS)
