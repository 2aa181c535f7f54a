"""Job, outbox and routing states are enums (``dicom_node.store.states``) whose values are the strings
the index has always stored and ``cytonode status --json`` has always printed, so an index
written before the enums reads the same and scripts reading the JSON see no change."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, text

from dicom_node.app.demo import StandInPACS
from dicom_node.jobs.routing import mark_queued, requeue_lost_jobs, route_stable_series
from dicom_node.jobs.worker import claim, finish
from dicom_node.settings import Destination, RoutingRule, Settings
from dicom_node.store.files import Store
from dicom_node.store.index import Job, OutboxItem, Series
from dicom_node.store.outbox import deliver_due
from dicom_node.store.states import JobStateValues, OutboxStateValues, SeriesRoutingValues
from tests.dicom_factory import MF_TRUE_COLOR_SC, multiframe_sc
from tests.peers import CYTONODE


def test_state_values_are_the_strings_stored_before_the_enums() -> None:
    assert [v.value for v in JobStateValues] == ["pending", "queued", "running", "done", "failed"]
    assert [v.value for v in OutboxStateValues] == ["pending", "sent"]
    assert [v.value for v in SeriesRoutingValues] == ["job", "ignored", "local"]
    for values, column in ((JobStateValues, Job.__table__.c.state),
                           (OutboxStateValues, OutboxItem.__table__.c.state),
                           (SeriesRoutingValues, Series.__table__.c.routing)):
        assert max(len(v.value) for v in values) <= column.type.length, column


def test_status_json_and_index_hold_the_same_state_strings(tmp_path: Path) -> None:
    """One store goes through every state: routed (job, ignored, local), queued, running, done,
    failed (worker lost), outbox pending then sent. ``cytonode status --json`` and the index's
    rows hold exactly the strings of before."""
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = StandInPACS(pacs_dir)
    settings = Settings(data_dir=tmp_path / "data",
                        destinations=(Destination.parse(f"DEMOPACS@127.0.0.1:{pacs.port}"),))
    store = Store(settings)
    try:
        rule = (RoutingRule(modality="OT", sop_class_uid=MF_TRUE_COLOR_SC, image_type=""),)
        analysed = [store.ingest_file(multiframe_sc(tmp_path / f"a{i}.dcm", 1, start=i))
                    for i in range(2)]
        later = time.time() + 60
        assert len(route_stable_series(store, rule, 0.0, now=later)) == 2
        ignored = store.ingest_file(multiframe_sc(tmp_path / "b.dcm", 1))
        assert route_stable_series(store, (), 0.0, now=later) == []
        result = store.add_dataset(dcmread(multiframe_sc(tmp_path / "result.dcm", 1)))

        with store.session() as session:
            done_id, lost_id = session.scalars(select(Job.id).order_by(Job.id)).all()
        mark_queued(store, done_id)
        assert _job_state(store, done_id) == "queued"
        assert claim(store, done_id) == 1 and claim(store, lost_id) == 1
        assert _job_state(store, done_id) == "running"
        with pytest.raises(ValueError, match="state must be done or failed"):
            finish(store, done_id, 1, JobStateValues.QUEUED)
        assert finish(store, done_id, 1, JobStateValues.DONE, result=None,
                      send=[result.sop_instance_uid])
        assert requeue_lost_jobs(store, 5, 1, now=later) == []  # its only attempt: failed

        before = json.loads(_status_json(settings))
        assert [o["state"] for o in before["outbox"]["items"]] == ["pending"]
        assert (before["outbox"]["pending"], before["outbox"]["sent"]) == (1, 0)
        assert deliver_due(store, settings) == 1

        status = json.loads(_status_json(settings))
        assert [(j["id"], j["state"], j["progress"]) for j in status["jobs"]] == [
            (done_id, "done", "done"), (lost_id, "failed", "failed")]
        assert [o["state"] for o in status["outbox"]["items"]] == ["sent"]
        assert (status["outbox"]["pending"], status["outbox"]["sent"]) == (0, 1)
        routing = {s["series_instance_uid"]: s["routing"] for s in status["series"]}
        assert routing == {analysed[0].series_instance_uid: "job",
                           analysed[1].series_instance_uid: "job",
                           ignored.series_instance_uid: "ignored",
                           result.series_instance_uid: "local"}
        with store.session() as session:  # the rows themselves, as another program reads them
            rows = session.execute(text(
                "SELECT 'job', state FROM jobs UNION ALL SELECT 'outbox', state FROM outbox "
                "UNION ALL SELECT 'series', routing FROM series")).all()
        assert sorted((kind, value) for kind, value in rows) == [
            ("job", "done"), ("job", "failed"), ("outbox", "sent"),
            ("series", "ignored"), ("series", "job"), ("series", "job"), ("series", "local")]
        assert [type(value) for _, value in rows] == [str] * len(rows)
    finally:
        store.close()
        pacs.stop()


def _job_state(store: Store, job_id: int) -> str:
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def _status_json(settings: Settings) -> str:
    """What ``cytonode status --json`` prints for the node whose data directory ``settings`` has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYTONODE_")}
    env["CYTONODE_DATA_DIR"] = str(settings.data_dir)
    return subprocess.run([CYTONODE, "status", "--json"], env=env, check=True, capture_output=True,
                          text=True, timeout=120).stdout
