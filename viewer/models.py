"""The viewer's tables, on the store's declarative base (same database as the node).

- ``users``: accounts with a hashed password and one role;
- ``login_failures``: failed logins, for throttling;
- ``cell_edits``: every change a reviewer made to a cell (append-only; undo marks a row undone);
- ``cell_views``: which cells a reviewer looked at (opened or selected in the review), once per
  user and cell: a flagged cell nobody looked at needs the signer's explicit confirmation;
- ``case_versions``: one row per version of a case's report; signing closes a version, an
  amendment opens the next one;
- ``audit_events``: who viewed, changed and signed what, and when;
- ``revoked_sessions``: sessions ended by logout, refused even if their signed cookie is replayed.
"""

from __future__ import annotations

import enum
import time

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.store.files import Base, create_all


class RoleValues(str, enum.Enum):
    """Roles of viewer accounts: technologists review, pathologists also sign, admins manage users."""

    TECHNOLOGIST = "technologist"
    PATHOLOGIST = "pathologist"
    ADMIN = "admin"


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(16))
    #: DICOM person name (``Family^Given``) written as Verifying Observer Name; "" = the user name.
    person_name: Mapped[str] = mapped_column(String(324), default="")
    #: Written into the final SR as Verifying Organization.
    organization: Mapped[str] = mapped_column(String(64), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class LoginFailure(Base):
    __tablename__ = "login_failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    remote_addr: Mapped[str] = mapped_column(String(64), default="")
    at: Mapped[float] = mapped_column(Float, default=time.time, index=True)


class CellEdit(Base):
    __tablename__ = "cell_edits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    cell_id: Mapped[int] = mapped_column(Integer)
    #: "label", "abnormal" or "unclassifiable"
    field: Mapped[str] = mapped_column(String(16))
    old_value: Mapped[str] = mapped_column(String(32))
    new_value: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer, default=1)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("users.id"))
    at: Mapped[float] = mapped_column(Float, default=time.time)
    undone: Mapped[bool] = mapped_column(Boolean, default=False)


class CellView(Base):
    __tablename__ = "cell_views"
    __table_args__ = (UniqueConstraint("series_instance_uid", "cell_id", "user_id",
                                       name="one_view_per_user_and_cell"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    cell_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("users.id"))
    #: the first time this user looked at the cell
    at: Mapped[float] = mapped_column(Float, default=time.time)


class CaseVersion(Base):
    __tablename__ = "case_versions"
    __table_args__ = (UniqueConstraint("series_instance_uid", "version", name="one_row_per_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[float] = mapped_column(Float, default=time.time)
    opened_by: Mapped[int | None] = mapped_column(Integer, ForeignKey("users.id"), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    signed_by: Mapped[int | None] = mapped_column(Integer, ForeignKey("users.id"), nullable=True)
    signed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: SOP Instance UID of the final SR this version issued.
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    username: Mapped[str] = mapped_column(String(64), default="")
    #: login, login_failed, logout, view, change, undo, sign, amend, user_add, export
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    remote_addr: Mapped[str] = mapped_column(String(64), default="")


class RevokedSession(Base):
    """A session ended by logout. The session cookie is signed, not stored, so a copy of it would
    stay valid until it expires; listing its ``sid`` here refuses it from then on."""

    __tablename__ = "revoked_sessions"
    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    revoked_at: Mapped[float] = mapped_column(Float, default=time.time, index=True)


def create_tables(engine: Engine) -> None:
    """Create the viewer's tables (the node's own are created with the :class:`~dicom_node.store.files.Store`)."""
    names = (User.__tablename__, LoginFailure.__tablename__, CellEdit.__tablename__,
             CellView.__tablename__, CaseVersion.__tablename__, AuditEvent.__tablename__, RevokedSession.__tablename__)
    create_all(engine, [Base.metadata.tables[name] for name in names])
