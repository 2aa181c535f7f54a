"""The analysis job: open the stored slide, find and classify the cells, store and queue the results.

A worker holds a running job under a lease: it renews ``heartbeat_at`` every quarter of
``job_lease_s``. If the worker dies, the node's router finds the lease expired and queues the
job again (:func:`dicom_node.jobs.routing.requeue_lost_jobs`). Each run has an attempt number; only
the current attempt may record the outcome, and it queues its results for sending in the same
transaction that marks the job done, so the results of a job go out once however often it ran.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from dicom_node.store.index import Instance, Job
from dicom_node.settings import VL_WSM, ReleasePolicyValues
from dicom_node.store.states import JobStateValues
from dicom_node.store.files import Store

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


def slide_metadata(paths: list[str]) -> dict[str, Any]:
    """Levels, sizes, pixel spacing and frame counts of one WSI series, read with wsidicom."""
    from wsidicom import WsiDicom

    with WsiDicom.open(paths) as slide:
        levels = []
        for level in slide.levels:
            spacing = level.pixel_spacing
            levels.append({
                "level": level.level,
                "width": level.size.width,
                "height": level.size.height,
                "tile_width": level.tile_size.width,
                "tile_height": level.tile_size.height,
                "pixel_spacing_mm": [spacing.width, spacing.height] if spacing else None,
            })
        base = levels[0]
        return {
            "levels": levels,
            "width": base["width"],
            "height": base["height"],
            "pixel_spacing_um": ([base["pixel_spacing_mm"][0] * 1000.0,
                                  base["pixel_spacing_mm"][1] * 1000.0]
                                 if base["pixel_spacing_mm"] else None),
        }


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
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        instances = session.scalars(select(Instance).where(
            Instance.series_instance_uid == job.series_instance_uid,
            Instance.sop_class_uid == VL_WSM)).all()
        paths = [str(store.path_of(i)) for i in instances]
        frames = sum(i.number_of_frames for i in instances)
    log.info("job %d (attempt %d): series %s, %d instances", job_id, attempt,
             job.series_instance_uid, len(paths))
    try:
        if not paths:
            raise ValueError("the series holds no VL Whole Slide Microscopy instance")
        meta = slide_metadata(paths)
        meta.update({"instances": len(paths), "frames": frames})
        meta.update(analyse(store, job_id, paths, attempt=attempt))
    except LeaseLostError:
        log.warning("job %d: attempt %d was superseded; it records and sends nothing", job_id, attempt)
        return
    except Exception as exc:  # job edge: record any failure on the job row, send nothing
        log.exception("job %d failed", job_id)
        finish(store, job_id, attempt, JobStateValues.FAILED, error=f"{type(exc).__name__}: {exc}")
        return
    send = (list(meta["objects"].values())
            if store.settings.release_policy is ReleasePolicyValues.IMMEDIATE else [])
    if lease.lost or not finish(store, job_id, attempt, JobStateValues.DONE, result=meta, send=send):
        log.warning("job %d: attempt %d was superseded; its results are not sent", job_id, attempt)
        return
    log.info("job %d done: %d cells", job_id, meta.get("cell_count", 0))


def analyse(store: Store, job_id: int, paths: list[str], *, attempt: int) -> dict[str, Any]:
    """Find and classify every white cell and store the DICOM results (``objects`` in the return).

    :func:`run_job` queues them for sending when it records the job done: under the
    ``immediate`` release policy at once (they are marked PRELIMINARY and UNVERIFIED);
    under ``final-only`` they wait for sign-off. Raises :class:`LeaseLostError` once
    another attempt has the job.
    """
    import torch

    from analysis.pipeline import PipelineConfig, ProgressEvent, classify_slide
    from dicom_node.app.analyze import differential, encode_results, stage_recorder, write_summary
    from dicom_node.encode.differential import Differential
    from dicom_node.settings import DeviceValues

    settings = store.settings
    device = settings.device.value
    if settings.device is DeviceValues.AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    last = [0.0]

    def progress(event: ProgressEvent) -> None:
        now = time.monotonic()
        if now - last[0] < 1.0 and not event.finished:
            return
        last[0] = now
        if not renew(store, job_id, attempt, f"{event.stage} {event.done}/{event.total}"):
            raise LeaseLostError(f"job {job_id}: attempt {attempt} no longer holds the job")

    files = [Path(p) for p in paths]
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    record = stage_recorder(timings, counts, then=progress)
    result = classify_slide(files, PipelineConfig(device=device, site=settings.active_site()),
                            progress=record)
    started = time.perf_counter()
    objects = encode_results(result, files, platelets_detected=counts.get("platelets"))
    timings["encode"] = round(time.perf_counter() - started, 3)
    outputs = {}
    for kind, ds in objects.items():
        stored = store.add_dataset(ds)
        outputs[kind] = stored.sop_instance_uid
    results_dir = settings.results_dir / result.series_instance_uid  # a validated UID, never a path
    write_summary(results_dir, result, files[0].parent, objects, timings, counts)
    return {
        "results_dir": str(results_dir),
        "timings_s": timings,
        "cell_count": len(result.cells),
        "differential": differential(result),
        "report": Differential.from_result(result, platelets_detected=counts.get("platelets")).as_json(),
        "review": len(result.review_cells),
        "abnormal": sum(1 for c in result.cells if c.abnormal),
        "validated_domain": str(result.provenance.parameters.get("validated_domain", "not checked")),
        "site_calibration": str(result.provenance.parameters.get("site_calibration", "none")),
        "objects": outputs,
    }


def finish(store: Store, job_id: int, attempt: int, state: JobStateValues | str, *,
            result: dict[str, Any] | None = None, error: str = "", send: list[str] | None = None) -> bool:
    """Record the outcome of attempt ``attempt`` and queue ``send`` for every destination, in one
    transaction; False (nothing recorded or queued) if the attempt no longer holds the job.

    Raises
    ------
    ValueError
        If ``state`` is not a final job state (done or failed).
    """
    state = JobStateValues(state)
    if state not in (JobStateValues.DONE, JobStateValues.FAILED):
        raise ValueError(f"state must be done or failed, not {state.value!r}")
    values: dict[str, Any] = {"state": state, "finished_at": time.time(), "progress": state,
                              "error": error}
    if result is not None:
        values["result_json"] = json.dumps(result)
    with store.session() as session:
        updated = session.execute(update(Job).where(
            Job.id == job_id, Job.attempts == attempt,
            Job.state == JobStateValues.RUNNING).values(**values))
        if not getattr(updated, "rowcount", 0):
            session.rollback()
            return False
        for uid in send or ():
            store.enqueue_in(session, uid)
        session.commit()
        return True
