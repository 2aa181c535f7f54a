"""The outbox: persistent rows, one per (instance, destination), retried with backoff.

The release rule lives here too: which results go out when a job is done
(:func:`release_when_analysed`) and which when a case is signed (:func:`release_when_signed`).
The worker and sign-off queue what these return with :func:`enqueue` (or :func:`enqueue_in`,
inside the transaction that records the job done); :func:`deliver_due` sends the rows.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.errors import SendRefusedError
from dicom_node.net.send import send_instances
from dicom_node.net.tls import client_tls_args
from dicom_node.settings import Destination, ReleasePolicyValues, Settings
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, OutboxItem
from dicom_node.store.states import OutboxStateValues

log = logging.getLogger(__name__)


def enqueue(store: Store, sop_instance_uid: str) -> int:
    """Queue a stored instance for every configured destination; return rows added (none for a
    destination that has it queued already).

    Raises
    ------
    KeyError
        If the instance is not in the store.
    """
    with store.session() as session:
        if session.get(Instance, sop_instance_uid) is None:
            raise KeyError(f"{sop_instance_uid} is not in the store")
        added = enqueue_in(store, session, sop_instance_uid)
        session.commit()
    return added


def enqueue_in(store: Store, session: Any, sop_instance_uid: str) -> int:
    """Add the outbox rows of :func:`enqueue` to ``session`` (the caller commits), for one
    transaction with other changes; return rows added."""
    added = 0
    for dest in store.settings.destinations:
        exists = session.scalar(select(OutboxItem.id).where(
            OutboxItem.sop_instance_uid == sop_instance_uid,
            OutboxItem.destination == str(dest)))
        if exists is None:
            session.add(OutboxItem(sop_instance_uid=sop_instance_uid, destination=str(dest),
                                   next_attempt_at=0.0))
            added += 1
    return added


def release_when_analysed(settings: Settings, object_uids: Sequence[str]) -> list[str]:
    """The results of a finished job to queue for sending now.

    Parameters
    ----------
    settings:
        The node's settings; their ``release_policy`` decides.
    object_uids:
        SOP Instance UIDs of the job's stored results (marked PRELIMINARY and UNVERIFIED).

    Returns
    -------
    list[str]
        All of them under the ``immediate`` policy; none under ``final-only``, where they wait
        for sign-off (:func:`release_when_signed`).
    """
    if settings.release_policy is ReleasePolicyValues.IMMEDIATE:
        return list(object_uids)
    return []


def release_when_signed(preliminary_uids: Sequence[str], final_uids: Sequence[str]) -> list[str]:
    """The objects to queue for sending when a case is signed: the preliminary results and the
    final ones, under either policy.

    Under ``immediate`` the preliminary results were queued when the job was done, and queuing
    them again adds no row for a destination that has one; under ``final-only`` this is when
    they go out, with the final SR and the final PDF report.
    """
    return [*preliminary_uids, *final_uids]


def deliver_due(store: Store, settings: Settings, now: float | None = None) -> int:
    """Try every outbox row that is due; return how many were delivered."""
    now = time.time() if now is None else now
    with store.session() as session:
        rows = session.execute(
            select(OutboxItem.id, OutboxItem.destination, Instance.sop_instance_uid,
                   Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.path)
            .join(Instance, Instance.sop_instance_uid == OutboxItem.sop_instance_uid)
            .where(OutboxItem.state == OutboxStateValues.PENDING, OutboxItem.next_attempt_at <= now)
            .order_by(OutboxItem.id)).all()
    by_dest: dict[str, list[tuple[int, str, str, str, Path]]] = defaultdict(list)
    for row_id, dest, sop, sop_class, syntax, rel in rows:
        by_dest[dest].append((row_id, sop, sop_class, syntax, store.root / rel))
    delivered = 0
    for dest_text, items in by_dest.items():
        destination = Destination.parse(dest_text)
        ids = {sop: row_id for row_id, sop, *_ in items}
        sent: list[str] = []
        try:
            send_instances([(sop, c, s, p) for _, sop, c, s, p in items], destination,
                           settings.ae_title, timeout_s=settings.network_timeout_s,
                           on_success=lambda sop_uid: _mark_sent(store, ids[sop_uid], sent),
                           tls_args=client_tls_args(settings, destination))
        except (SendRefusedError, OSError) as exc:
            _backoff(store, settings, [i[0] for i in items], str(exc))
            log.warning("outbox: %s; will retry", exc)
        delivered += len(sent)
        for sop_uid in sent:
            log.info("delivered %s to %s", sop_uid, dest_text)
    return delivered


def _mark_sent(store: Store, row_id: int, sent: list[str]) -> None:
    """Record one delivery at once, so a crash right after it cannot cause a resend."""
    with store.session() as session:
        item = session.get(OutboxItem, row_id)
        assert item is not None
        item.state, item.sent_at = OutboxStateValues.SENT, time.time()
        item.attempts += 1
        item.last_error = ""
        session.commit()
        sent.append(item.sop_instance_uid)


def _backoff(store: Store, settings: Settings, row_ids: list[int], error: str) -> None:
    with store.session() as session:
        for row_id in row_ids:
            item = session.get(OutboxItem, row_id)
            if item is None or item.state != OutboxStateValues.PENDING:
                continue
            item.attempts += 1
            delay = min(settings.outbox_retry_max_s,
                        settings.outbox_retry_initial_s * 2 ** min(item.attempts - 1, 20))
            item.next_attempt_at = time.time() + delay
            item.last_error = error[:1000]
        session.commit()
