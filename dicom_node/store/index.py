"""The index: tables of studies, series, instances, jobs and the outbox (SQLAlchemy).

SQLite under the data directory by default (WAL mode, so the node, its worker
and ``cytonode status`` can use it at once); any SQLAlchemy URL, PostgreSQL
included, works the same.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from dicom_node.store.states import JobStateValues, OutboxStateValues


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    # Query/Retrieve and QIDO-RS matching keys (PS3.4 C.6.1.1.2, C.6.2.1.2).
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Series(Base):
    __tablename__ = "series"
    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("studies.study_instance_uid"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[str] = mapped_column(String(12), default="")
    #: Time of the last instance received (seconds since the epoch).
    last_received_at: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    #: None while receiving, then a :class:`~dicom_node.store.states.SeriesRoutingValues`: "job" once a
    #: job was made; "ignored" when no rule matched; "local" for series the node created itself.
    routing: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)


class Instance(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    image_type: Mapped[str] = mapped_column(String(200), default="")
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    #: Instance Number (0020,0013), for Query/Retrieve and QIDO-RS; None when absent.
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(String(300))
    size: Mapped[int] = mapped_column(Integer)
    #: SHA-256 of the dataset bytes after the file meta; "" until first needed (a resend).
    sha256: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[float] = mapped_column(Float, default=time.time)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_instance_uid", name="one_job_per_series"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_instance_uid"))
    #: A :class:`~dicom_node.store.states.JobStateValues`: pending -> queued -> running -> done | failed
    state: Mapped[str] = mapped_column(String(16), default=JobStateValues.PENDING, index=True)
    progress: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Runs started; the running one is the attempt number, which fences out a stale worker.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The worker holding a running job ("host:pid") and when it last renewed its lease.
    worker: Mapped[str] = mapped_column(String(64), default="")
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result_json: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")


class OutboxItem(Base):
    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="one_row_per_peer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("instances.sop_instance_uid"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    #: An :class:`~dicom_node.store.states.OutboxStateValues`: pending -> sent (or pending again with a
    #: later next_attempt_at)
    state: Mapped[str] = mapped_column(String(16), default=OutboxStateValues.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def make_engine(url: str) -> Engine:
    """Create the engine and the tables. SQLite gets WAL and a busy timeout."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()
    create_all(engine)
    _add_missing_columns(engine)
    return engine


def create_all(engine: Engine, tables: list[Any] | None = None) -> None:
    """``Base.metadata.create_all``, safe when another process (the node, its worker, the web
    application) creates the same tables at the same moment: SQLAlchemy checks, then creates,
    so the loser of that race sees "already exists"; it checks again and finds them."""
    try:
        Base.metadata.create_all(engine, tables=tables)
    except (OperationalError, ProgrammingError, IntegrityError):
        time.sleep(0.2)
        Base.metadata.create_all(engine, tables=tables)


def _add_missing_columns(engine: Engine) -> None:
    """Add columns introduced after an index was created (``create_all`` leaves tables alone).

    Only nullable or defaulted columns are added, so existing rows stay valid; their new
    values are empty until the instance is indexed again.
    """
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                ddl_type = column.type.compile(dialect=engine.dialect)
                default = "" if column.nullable else " NOT NULL DEFAULT ''" \
                    if isinstance(column.type, String) else " NOT NULL DEFAULT 0"
                conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" '
                                  f'{ddl_type}{default}'))


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)
