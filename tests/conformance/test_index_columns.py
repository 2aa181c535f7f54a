"""The Q/R columns are added to an index made before them, and filled on ingest."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import inspect

from dicom_node.settings import Settings
from dicom_node.store.files import Store
from dicom_node.store.index import make_engine
from tests.dicom_factory import multiframe_sc

OLD_SCHEMA = """
CREATE TABLE studies (study_instance_uid VARCHAR(64) PRIMARY KEY, patient_id VARCHAR(64) NOT NULL,
  patient_name VARCHAR(324) NOT NULL, study_date VARCHAR(8) NOT NULL,
  accession_number VARCHAR(16) NOT NULL, study_description VARCHAR(64) NOT NULL,
  created_at FLOAT NOT NULL);
INSERT INTO studies VALUES ('1.2.3', 'P1', 'Old^Patient', '20200101', '', '', 0);
"""


def test_old_index_gets_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
    engine = make_engine(f"sqlite:///{db}")
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("studies")}
        assert {"patient_birth_date", "patient_sex", "study_time", "study_id",
                "referring_physician_name"} <= columns
        assert "instance_number" in {c["name"] for c in inspect(engine).get_columns("instances")}
    finally:
        engine.dispose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT patient_name, study_time FROM studies").fetchall() == [
            ("Old^Patient", "")]


def test_ingest_fills_the_query_columns(tmp_path: Path) -> None:
    store = Store(Settings(data_dir=tmp_path / "data"))
    try:
        result = store.ingest_file(multiframe_sc(tmp_path / "sc.dcm", 1))
        from dicom_node.store.index import Instance, Series, Study

        with store.session() as s:
            series = s.get(Series, result.series_instance_uid)
            study = s.get(Study, series.study_instance_uid)
            inst = s.get(Instance, result.sop_instance_uid)
            assert (study.study_time, study.study_id, inst.instance_number) == ("120000", "1", 1)
    finally:
        store.close()


OLD_JOBS = """
CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_instance_uid VARCHAR(64) NOT NULL,
  state VARCHAR(16) NOT NULL, progress VARCHAR(200) NOT NULL, created_at FLOAT NOT NULL,
  started_at FLOAT, finished_at FLOAT, attempts INTEGER NOT NULL, result_json TEXT NOT NULL,
  error TEXT NOT NULL, CONSTRAINT one_job_per_series UNIQUE (series_instance_uid));
INSERT INTO jobs VALUES (1, '1.2.3.4', 'running', 'segment 1/2', 0, 5, NULL, 1, '', '');
"""


def test_old_index_gets_the_job_lease_columns(tmp_path: Path) -> None:
    """A job running when the node was upgraded has no lease yet: ``heartbeat_at`` is NULL, and the
    router falls back to its start time (see ``routing.requeue_lost_jobs``)."""
    db = tmp_path / "index.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_JOBS)
    make_engine(f"sqlite:///{db}").dispose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT state, attempts, worker, heartbeat_at FROM jobs").fetchall() == [
            ("running", 1, "", None)]
