"""Workers that survive a crash: Redis broker, PostgreSQL index, one ``serve`` without an embedded
worker and two ``cytonode worker`` processes. Three slides arrive at once; one worker is killed
with SIGKILL in the middle of a job. Its job's lease runs out, the node queues it again, the other
worker runs it, and every job's results reach the PACS exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.app.demo import SAMPLE_SLIDE, StandInPACS
from tests.dicom_factory import with_new_uids
from tests.peers import CYTONODE, PostgresProcess, RedisProcess, require_tool

LEASE_S = 8.0
#: One more slide than workers: a job waits in the queue while both run one.
SLIDES = 3


def copy_slide(out: Path) -> tuple[str, list[Path]]:
    """The sample slide under a new study, series and SOP Instance UIDs; returns (study, files)."""
    study, series = generate_uid(), generate_uid()
    return study, [with_new_uids(path, out / path.name, series_uid=series, study_uid=study)
                   for path in sorted(SAMPLE_SLIDE.glob("*.dcm"))]


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:  # its own process group, so SIGKILL reaches any child too
        return subprocess.Popen([CYTONODE, "worker"], env={**env, "CYTONODE_WORKERS": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def peers(tmp_path: Path):
    pg_dir = Path("/tmp") / f"cytonode-pg-{tmp_path.name}"  # readable by the postgres user
    redis = RedisProcess(tmp_path / "redis").start()
    pg = PostgresProcess(pg_dir).start()
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = StandInPACS(pacs_dir)
    try:
        yield redis, pg, pacs
    finally:
        pacs.stop()
        redis.stop()
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.mark.slow  # two workers analyse three slides, one is killed mid-job
def test_killed_worker_job_is_rerun_once_by_the_other(start_node, peers, tmp_path: Path) -> None:
    redis, pg, pacs = peers
    node = start_node(workers=0, broker_url=f"redis://127.0.0.1:{redis.port}/0",
                      database_url=pg.url, destinations=f"DEMOPACS@127.0.0.1:{pacs.port}",
                      outbox_retry_initial_s=0.5, job_lease_s=LEASE_S)
    workers = [start_worker(node.env, tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        slides = [copy_slide(tmp_path / f"slide-{i}") for i in range(SLIDES)]
        senders = []
        tool = require_tool("storescu")
        for _, files in slides:  # the slides at once, one association each
            senders.append(subprocess.Popen(
                [tool, "-R", "-xy", "-aec", "CYTONODE", "127.0.0.1", str(node.port),
                 *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert all(p.wait(timeout=120) == 0 for p in senders)

        # Both workers hold a job, each in the middle of its analysis (past opening the slide).
        def two_running(s: dict) -> bool:
            running = [j for j in s["jobs"] if j["state"] == "running"
                       and j["progress"] != "opening slide"]
            return len({j["worker"] for j in running}) == 2
        status = node.wait_for(two_running, timeout=120, what="both workers running a job")
        pids = {w.pid: w for w in workers}
        victim_job = next(j for j in status["jobs"] if j["state"] == "running")
        victim_pid = int(victim_job["worker"].rsplit(":", 1)[1])
        assert victim_pid in pids, (victim_job, list(pids))
        killed_at = time.monotonic()
        os.killpg(victim_pid, signal.SIGKILL)
        pids[victim_pid].wait(timeout=30)

        status = node.wait_for(lambda s: len(s["jobs"]) == SLIDES and all(
            j["state"] in ("done", "failed") for j in s["jobs"]), timeout=240,
            what="every job to end")
        recovered_s = time.monotonic() - killed_at
        jobs = {j["id"]: j for j in status["jobs"]}
        assert all(j["state"] == "done" for j in jobs.values()), [j["error"] for j in jobs.values()]
        assert jobs[victim_job["id"]]["attempts"] == 2
        assert all(j["attempts"] == 1 for j in jobs.values() if j["id"] != victim_job["id"])
        survivor = next(w for w in workers if w.pid != victim_pid)
        assert jobs[victim_job["id"]]["worker"].endswith(f":{survivor.pid}")
        assert len({j["worker"] for j in status["jobs"] if j["id"] != victim_job["id"]}
                   | {victim_job["worker"]}) == 2, "both workers took jobs"

        # Each job's results reach the PACS exactly once: one SR, ANN and SEG per study.
        expected = sum(len(j["result"]["objects"]) for j in jobs.values())
        node.wait_for(lambda s: s["outbox"]["sent"] == expected and s["outbox"]["pending"] == 0,
                      timeout=120, what="delivery of every result")
        time.sleep(2)  # a late duplicate would arrive now
        per_study: Counter[tuple[str, str]] = Counter()
        for modality, uid in pacs.received:
            ds = dcmread(pacs.folder / f"{uid}.dcm", stop_before_pixels=True)
            per_study[(str(ds.StudyInstanceUID), modality)] += 1
        for study, _ in slides:
            assert per_study[(study, "SR")] == 1, per_study
            assert per_study[(study, "ANN")] == 1, per_study
            assert per_study[(study, "SEG")] == 1, per_study
        assert len(pacs.received) == expected
        print(f"recovered {recovered_s:.1f} s after the kill (lease {LEASE_S} s)")
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait(timeout=30)


def test_a_stale_attempt_can_neither_record_nor_send(tmp_path: Path) -> None:
    """A worker whose lease ran out (slow, not dead) finds its job given to a new attempt: it can
    renew nothing and record nothing, and only the current attempt queues results for sending.
    A job lost ``job_max_attempts`` times is failed, not queued again."""
    from dicom_node.jobs.routing import requeue_lost_jobs
    from dicom_node.jobs.worker import claim, finish, renew
    from dicom_node.settings import Destination, Settings
    from dicom_node.store.files import Store
    from dicom_node.store.index import Job, OutboxItem
    from tests.dicom_factory import multiframe_sc

    settings = Settings(data_dir=tmp_path / "data", job_lease_s=5, job_max_attempts=2,
                        destinations=(Destination.parse("PACS@127.0.0.1:104"),))
    store = Store(settings)
    try:
        stored = [store.ingest_file(multiframe_sc(tmp_path / f"sc{i}.dcm", 1)) for i in range(2)]
        with store.session() as session:
            jobs = [Job(series_instance_uid=s.series_instance_uid, state="queued") for s in stored]
            session.add_all(jobs)
            session.commit()
            ids = [j.id for j in jobs]
        later = time.time() + 60  # every lease has run out by then
        assert claim(store, ids[0]) == 1 and claim(store, ids[0]) == 0
        assert requeue_lost_jobs(store, 5, 2, now=time.time()) == []  # the lease holds
        assert requeue_lost_jobs(store, 5, 2, now=later) == [ids[0]]
        assert claim(store, ids[0]) == 2
        assert not renew(store, ids[0], 1, "segment 3/9")
        result = stored[0].sop_instance_uid
        assert not finish(store, ids[0], 1, "done", send=[result])
        assert renew(store, ids[0], 2, "segment 3/9")
        assert finish(store, ids[0], 2, "done", send=[result])
        assert not finish(store, ids[0], 2, "done", send=[result])

        assert claim(store, ids[1]) == 1
        assert requeue_lost_jobs(store, 5, 2, now=later) == [ids[1]]
        assert claim(store, ids[1]) == 2
        assert requeue_lost_jobs(store, 5, 2, now=later) == []  # the second loss fails it
        with store.session() as session:
            assert [o.sop_instance_uid for o in session.scalars(select(OutboxItem))] == [result]
            done, failed = session.get(Job, ids[0]), session.get(Job, ids[1])
            assert (done.state, done.attempts) == ("done", 2)
            assert (failed.state, failed.attempts) == ("failed", 2)
            assert "lost 2 times" in failed.error
        assert not finish(store, ids[1], 2, "done")
    finally:
        store.close()
