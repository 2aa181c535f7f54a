"""The analysis job: open the stored slide, find and classify the cells, store and queue the results.

A worker holds a running job under a lease: it renews ``heartbeat_at`` every quarter of
``job_lease_s``. If the worker dies, the node's router finds the lease expired and queues the
job again (:func:`dicom_node.jobs.routing.requeue_lost_jobs`). Each run has an attempt number; only
the current attempt may record the outcome, and it queues its results for sending in the same
transaction that marks the job done, so the results of a job go out once however often it ran.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from dicom_node.jobs.result import JobResult
from dicom_node.settings import Settings
from dicom_node.store.files import Store
from dicom_node.store.index import Job
from dicom_node.store.outbox import enqueue_in, release_when_analysed
from dicom_node.store.queries import slide_files
from dicom_node.store.states import JobStateValues

if TYPE_CHECKING:
    from analysis.pipeline import PipelineConfig
    from analysis.tiles import Slide

log = logging.getLogger(__name__)

#: This worker process, as recorded on the jobs it runs.
WORKER_NAME = f"{socket.gethostname()[:40]}:{os.getpid()}"


class LeaseLostError(RuntimeError):
    """The job was given to another attempt (this worker's lease expired); stop without recording."""


def claim(store: Store, job_id: int) -> int:
    """Atomically move a job from pending/queued to running; return the attempt number, or 0
    if someone else has it or it is finished."""
    now = time.time()
    with store.session() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id,
                              Job.state.in_((JobStateValues.PENDING, JobStateValues.QUEUED)))
            .values(state=JobStateValues.RUNNING, started_at=now, heartbeat_at=now,
                    attempts=Job.attempts + 1, worker=WORKER_NAME, progress="opening slide"))
        if not getattr(result, "rowcount", 0):
            session.rollback()
            return 0
        attempt = int(session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0)
        session.commit()
        return attempt


def renew(store: Store, job_id: int, attempt: int, progress: str | None = None) -> bool:
    """Renew the lease of attempt ``attempt`` (and set its progress); False if it is no longer ours."""
    values: dict[str, Any] = {"heartbeat_at": time.time()}
    if progress is not None:
        values["progress"] = progress[:200]
    with store.session() as session:
        result = session.execute(update(Job).where(
            Job.id == job_id, Job.attempts == attempt,
            Job.state == JobStateValues.RUNNING).values(**values))
        session.commit()
        return bool(getattr(result, "rowcount", 0))


class Lease(threading.Thread):
    """Renews a running job's lease every quarter of ``job_lease_s`` until stopped, also during
    long stages that report no progress."""

    def __init__(self, store: Store, job_id: int, attempt: int) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self.interval = store.settings.job_lease_s / 4
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if not renew(self.store, self.job_id, self.attempt):
                    self.lost = True
                    log.warning("job %d: attempt %d lost its lease", self.job_id, self.attempt)
                    return
            except Exception:  # a database hiccup: try again next interval; the lease is long
                log.exception("job %d: renewing the lease failed", self.job_id)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def run_job(store: Store, job_id: int) -> None:
    """Run one analysis job; its outcome and any error are recorded in the index."""
    attempt = claim(store, job_id)
    if not attempt:
        log.info("job %d is not pending (already taken or finished)", job_id)
        return
    lease = Lease(store, job_id, attempt)
    lease.start()
    try:
        _run_attempt(store, job_id, attempt, lease)
    finally:
        lease.stop()


def _run_attempt(store: Store, job_id: int, attempt: int, lease: Lease) -> None:
    from analysis.tiles import Slide

    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        series_instance_uid = job.series_instance_uid
    files = slide_files(store, series_instance_uid)
    log.info("job %d (attempt %d): series %s, %d instances", job_id, attempt,
             series_instance_uid, len(files.paths))
    try:
        if not files:
            raise ValueError("the series holds no VL Whole Slide Microscopy instance")
        started = time.perf_counter()
        with Slide.open(files.paths) as slide:  # the job's one read of the slide, handed on
            opened_s = time.perf_counter() - started
            result = analyse(store, job_id, slide, attempt=attempt, opened_s=opened_s,
                             instances=len(files.paths), frames=files.frames)
    except LeaseLostError:
        log.warning("job %d: attempt %d was superseded; it records and sends nothing", job_id, attempt)
        return
    except Exception as exc:  # job edge: record any failure on the job row, send nothing
        log.exception("job %d failed", job_id)
        finish(store, job_id, attempt, JobStateValues.FAILED, error=f"{type(exc).__name__}: {exc}")
        return
    send = release_when_analysed(store.settings, list(result.objects.values()))
    if lease.lost or not finish(store, job_id, attempt, JobStateValues.DONE, result=result, send=send):
        log.warning("job %d: attempt %d was superseded; its results are not sent", job_id, attempt)
        return
    log.info("job %d done: %d cells", job_id, result.cell_count)


def pipeline_config(settings: Settings) -> PipelineConfig:
    """The analysis a job runs, from the settings' ``analysis`` section and the active site
    calibration."""
    from analysis.pipeline import PipelineConfig

    section = settings.analysis
    return PipelineConfig(weights_dir=Path(section.weights_dir) if section.weights_dir else None,
                          device=section.resolved_device(),
                          n_timesteps=section.classifier_timesteps or None,
                          heatmaps=section.heatmaps, site=settings.active_site())


def analyse(store: Store, job_id: int, slide: Slide, *, attempt: int, opened_s: float = 0.0,
            instances: int, frames: int) -> JobResult:
    """Find and classify every white cell of the open ``slide`` and store the DICOM results.

    The slide is read once: the classifier, the encoders (its headers) and the gallery (its
    crops) all use the one the job opened. :func:`run_job` queues the results (the returned
    :class:`JobResult`'s ``objects``) for sending when it records the job done: under the
    ``immediate`` release policy at once (they are marked PRELIMINARY and UNVERIFIED); under
    ``final-only`` they wait for sign-off. ``opened_s``, the seconds opening the slide took,
    counts into the ``read`` stage; ``instances`` and ``frames`` describe the stored series.

    Raises
    ------
    LeaseLostError
        Once another attempt has the job.
    """
    from analysis.pipeline import ProgressEvent, classify_slide
    from dicom_node.jobs.encoding import encode_results
    from dicom_node.jobs.result import stage_recorder, write_summary

    settings = store.settings
    config = pipeline_config(settings)
    last = [0.0]

    def progress(event: ProgressEvent) -> None:
        now = time.monotonic()
        if now - last[0] < 1.0 and not event.finished:
            return
        last[0] = now
        if not renew(store, job_id, attempt, f"{event.stage} {event.done}/{event.total}"):
            raise LeaseLostError(f"job {job_id}: attempt {attempt} no longer holds the job")

    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    record = stage_recorder(timings, counts, then=progress)
    result = classify_slide(slide, config, progress=record)
    timings["read"] = round(timings.get("read", 0.0) + opened_s, 3)  # opening is reading
    started = time.perf_counter()
    objects = encode_results(result, slide, platelets_detected=counts.get("platelets"),
                             params=settings.encoder.params())
    timings["encode"] = round(time.perf_counter() - started, 3)
    outputs = {}
    for kind, ds in objects.items():
        stored = store.add_dataset(ds)
        outputs[kind] = stored.sop_instance_uid
    results_dir = settings.results_dir / result.series_instance_uid  # a validated UID, never a path
    summary = write_summary(results_dir, result, slide.files[0].parent, objects, timings, counts)
    meta = slide.metadata()
    return JobResult(
        levels=meta["levels"], width=meta["width"], height=meta["height"],
        pixel_spacing_um=meta["pixel_spacing_um"], instances=instances, frames=frames,
        results_dir=str(results_dir),
        timings_s=timings,
        cell_count=len(result.cells),
        differential=summary.differential,
        report=summary.report,
        review=len(result.review_cells),
        abnormal=sum(1 for c in result.cells if c.abnormal),
        validated_domain=str(result.provenance.parameters.get("validated_domain", "not checked")),
        site_calibration=str(result.provenance.parameters.get("site_calibration", "none")),
        objects=outputs,
    )


def finish(store: Store, job_id: int, attempt: int, state: JobStateValues | str, *,
           result: JobResult | None = None, error: str = "", send: list[str] | None = None) -> bool:
    """Record the outcome of attempt ``attempt`` (``result``, written as its versioned JSON) and
    queue ``send`` for every destination, in one transaction; False (nothing recorded or queued)
    if the attempt no longer holds the job.

    Raises
    ------
    ValueError
        If ``state`` is not a final job state (done or failed).
    TypeError
        If ``result`` is not a :class:`JobResult`.
    """
    state = JobStateValues(state)
    if state not in (JobStateValues.DONE, JobStateValues.FAILED):
        raise ValueError(f"state must be done or failed, not {state.value!r}")
    if result is not None and not isinstance(result, JobResult):
        raise TypeError(f"result must be a JobResult, not {type(result).__name__}")
    values: dict[str, Any] = {"state": state, "finished_at": time.time(), "progress": state,
                              "error": error}
    if result is not None:
        values["result_json"] = result.to_json()
    with store.session() as session:
        updated = session.execute(update(Job).where(
            Job.id == job_id, Job.attempts == attempt,
            Job.state == JobStateValues.RUNNING).values(**values))
        if not getattr(updated, "rowcount", 0):
            session.rollback()
            return False
        for uid in send or ():
            enqueue_in(store, session, uid)
        session.commit()
        return True
