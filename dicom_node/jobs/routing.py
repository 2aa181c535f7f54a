"""Routing: a series is stable after ``stable_age_s`` without a new instance; then the
rules decide whether it is analysed, and exactly one job is made for it."""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from dicom_node.settings import RoutingRule
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, Job, Series
from dicom_node.store.states import JobStateValues, SeriesRoutingValues

log = logging.getLogger(__name__)


def rule_matches(rule: RoutingRule, series: Series, instances: list[Instance]) -> bool:
    """True if ``rule`` selects the series (modality, SOP class and ImageType)."""
    if rule.modality and series.modality != rule.modality:
        return False
    for inst in instances:
        if rule.sop_class_uid and inst.sop_class_uid != rule.sop_class_uid:
            continue
        if rule.image_type and rule.image_type not in inst.image_type.split("\\"):
            continue
        return True
    return False


def route_stable_series(store: Store, rules: tuple[RoutingRule, ...], stable_age_s: float,
                        now: float | None = None) -> list[int]:
    """Make a job for each stable series a rule matches; return the new job ids."""
    now = time.time() if now is None else now
    new_jobs: list[int] = []
    with store.session() as session:
        stable = session.scalars(select(Series).where(
            Series.routing.is_(None), Series.last_received_at <= now - stable_age_s)).all()
        for series in stable:
            instances = list(session.scalars(select(Instance).where(
                Instance.series_instance_uid == series.series_instance_uid)).all())
            if any(rule_matches(rule, series, instances) for rule in rules):
                job = Job(series_instance_uid=series.series_instance_uid,
                          state=JobStateValues.PENDING)
                session.add(job)
                series.routing = SeriesRoutingValues.JOB
                try:
                    session.commit()
                except IntegrityError:  # another router made it first
                    session.rollback()
                    continue
                new_jobs.append(job.id)
                log.info("series %s is stable (%d instances): job %d", series.series_instance_uid,
                         len(instances), job.id)
            else:
                series.routing = SeriesRoutingValues.IGNORED
                session.commit()
                log.info("series %s is stable; no routing rule matches", series.series_instance_uid)
    return new_jobs


def pending_jobs(store: Store) -> list[int]:
    """Jobs made but not yet handed to the broker (e.g. after a crash)."""
    with store.session() as session:
        return list(session.scalars(select(Job.id).where(
            Job.state == JobStateValues.PENDING)).all())


def requeue_lost_jobs(store: Store, lease_s: float, max_attempts: int,
                      now: float | None = None) -> list[int]:
    """Give back to the queue every running job whose worker has not renewed its lease for
    ``lease_s`` (it died, or hangs); fail it instead once it has run ``max_attempts`` times.

    Returns the ids put back to ``pending``, which the router dispatches again. The worker that
    lost the lease can no longer record the outcome (see :mod:`dicom_node.jobs.worker`).
    """
    now = time.time() if now is None else now
    last_seen = func.coalesce(Job.heartbeat_at, Job.started_at, 0.0)
    requeued: list[int] = []
    with store.session() as session:
        lost = session.execute(select(Job.id, Job.attempts, Job.worker).where(
            Job.state == JobStateValues.RUNNING, last_seen < now - lease_s)).all()
        for job_id, attempts, worker in lost:
            if attempts >= max_attempts:
                new_state = JobStateValues.FAILED
                values = {"state": new_state, "finished_at": now, "progress": new_state,
                          "error": f"the worker was lost {attempts} times (last {worker or 'unknown'}, "
                                   f"no lease renewal for {lease_s:g} s); not retried"}
            else:
                new_state = JobStateValues.PENDING
                values = {"state": new_state,
                          "progress": f"requeued: worker {worker or 'unknown'} lost"}
            result = session.execute(update(Job).where(
                Job.id == job_id, Job.state == JobStateValues.RUNNING, Job.attempts == attempts,
                last_seen < now - lease_s).values(**values))
            session.commit()
            if getattr(result, "rowcount", 0):
                log.warning("job %d: worker %s lost (attempt %d of %d); %s", job_id, worker, attempts,
                            max_attempts,
                            "failed" if new_state is JobStateValues.FAILED else "requeued")
                if new_state is JobStateValues.PENDING:
                    requeued.append(job_id)
    return requeued


def mark_queued(store: Store, job_id: int) -> None:
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.state == JobStateValues.PENDING:
            job.state = JobStateValues.QUEUED
            session.commit()
