"""The analysis job: open the stored slide and record what it is.

Later stages (cell finding, classification, encoding) hang off :func:`run_job`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from dicom_node.index import Instance, Job
from dicom_node.settings import VL_WSM
from dicom_node.store import Store

log = logging.getLogger(__name__)



def claim(store: Store, job_id: int) -> bool:
    """Atomically move a job from pending/queued to running; False if someone else has it."""
    with store.session() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.state.in_(("pending", "queued")))
            .values(state="running", started_at=time.time(), attempts=Job.attempts + 1,
                    progress="opening slide"))
        session.commit()
        return bool(getattr(result, "rowcount", 0))


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
    if not claim(store, job_id):
        log.info("job %d is not pending (already taken or finished)", job_id)
        return
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        instances = session.scalars(select(Instance).where(
            Instance.series_instance_uid == job.series_instance_uid,
            Instance.sop_class_uid == VL_WSM)).all()
        paths = [str(store.path_of(i)) for i in instances]
        frames = sum(i.number_of_frames for i in instances)
    log.info("job %d: series %s, %d instances", job_id, job.series_instance_uid, len(paths))
    try:
        if not paths:
            raise ValueError("the series holds no VL Whole Slide Microscopy instance")
        meta = slide_metadata(paths)
        meta.update({"instances": len(paths), "frames": frames})
        meta.update(analyse(store, job_id, paths))
    except Exception as exc:  # job edge: record any failure on the job row, send nothing
        log.exception("job %d failed", job_id)
        _finish(store, job_id, "failed", error=f"{type(exc).__name__}: {exc}")
        return
    _finish(store, job_id, "done", result=meta)
    log.info("job %d done: %d cells", job_id, meta.get("cell_count", 0))


def analyse(store: Store, job_id: int, paths: list[str]) -> dict[str, Any]:
    """Find and classify every white cell, store the DICOM results and queue them.

    Under the ``immediate`` release policy the results go to the outbox at once
    (they are marked PRELIMINARY and UNVERIFIED); under ``final-only`` they wait.
    """
    import torch

    from analysis.pipeline import PipelineConfig, ProgressEvent, classify_slide
    from dicom_node.analyze import differential, encode_results, stage_recorder, write_summary
    from dicom_node.encode.differential import Differential
    from dicom_node.settings import DeviceValues, ReleasePolicyValues

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
        with store.session() as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.progress = f"{event.stage} {event.done}/{event.total}"[:200]
                session.commit()

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
        if settings.release_policy is ReleasePolicyValues.IMMEDIATE:
            store.enqueue(stored.sop_instance_uid)
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


def _finish(store: Store, job_id: int, state: str, *, result: dict[str, Any] | None = None,
            error: str = "") -> None:
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state
        job.finished_at = time.time()
        job.progress = state
        job.error = error
        if result is not None:
            job.result_json = json.dumps(result)
        session.commit()
