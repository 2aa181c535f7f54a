"""``cytonode status``: studies, series, jobs and outbox of a node, read from its index.

A job's result is read through :class:`dicom_node.jobs.result.JobResult` (the versioned
hand-over), so an unknown or damaged result document is refused with a clear error.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from dicom_node.jobs.result import JobResult
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, Job, OutboxItem, Series, Study
from dicom_node.store.states import OutboxStateValues


def node_status(store: Store) -> dict[str, Any]:
    """The node's state as plain JSON-ready values."""
    with store.session() as session:
        counts = dict(session.execute(
            select(Instance.series_instance_uid, func.count()).group_by(Instance.series_instance_uid)).all())
        frames = dict(session.execute(
            select(Instance.series_instance_uid, func.sum(Instance.number_of_frames))
            .group_by(Instance.series_instance_uid)).all())
        sizes = dict(session.execute(
            select(Instance.series_instance_uid, func.sum(Instance.size))
            .group_by(Instance.series_instance_uid)).all())
        series_rows = session.scalars(select(Series).order_by(Series.last_received_at)).all()
        series = [{
            "series_instance_uid": s.series_instance_uid,
            "study_instance_uid": s.study_instance_uid,
            "modality": s.modality,
            "series_description": s.series_description,
            "instances": int(counts.get(s.series_instance_uid, 0)),
            "frames": int(frames.get(s.series_instance_uid) or 0),
            "bytes": int(sizes.get(s.series_instance_uid) or 0),
            "routing": s.routing or "receiving",
            "last_received_at": s.last_received_at,
        } for s in series_rows]
        studies = [{
            "study_instance_uid": st.study_instance_uid,
            "patient_id": st.patient_id,
            "study_date": st.study_date,
            "accession_number": st.accession_number,
            "series": sum(1 for s in series if s["study_instance_uid"] == st.study_instance_uid),
        } for st in session.scalars(select(Study).order_by(Study.created_at)).all()]
        jobs = [{
            "id": j.id,
            "series_instance_uid": j.series_instance_uid,
            "state": j.state,
            "progress": j.progress,
            "attempts": j.attempts,
            "worker": j.worker,
            "heartbeat_at": j.heartbeat_at,
            "created_at": j.created_at,
            "started_at": j.started_at,
            "finished_at": j.finished_at,
            "result": JobResult.from_json(j.result_json).as_dict() if j.result_json else None,
            "error": j.error or None,
        } for j in session.scalars(select(Job).order_by(Job.id)).all()]
        items = session.scalars(select(OutboxItem).order_by(OutboxItem.id)).all()
        outbox = {
            "pending": sum(1 for i in items if i.state == OutboxStateValues.PENDING),
            "sent": sum(1 for i in items if i.state == OutboxStateValues.SENT),
            "items": [{
                "id": i.id, "sop_instance_uid": i.sop_instance_uid, "destination": i.destination,
                "state": i.state, "attempts": i.attempts, "next_attempt_at": i.next_attempt_at,
                "last_error": i.last_error or None, "sent_at": i.sent_at,
            } for i in items],
        }
    return {"studies": studies, "series": series, "jobs": jobs, "outbox": outbox}
