"""The audit log: who viewed, changed and signed what and when; admins read it and export CSV."""

from __future__ import annotations

import csv
import datetime
import io
from typing import Any

from flask import Blueprint, Response, abort, render_template, request
from sqlalchemy import select

from viewer import common
from viewer.auth import role_required
from viewer.models import AuditEvent, RoleValues

bp = Blueprint("audit", __name__)
bp.before_request(common.check_csrf)

PAGE_SIZE = 500


def _events() -> list[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.id.desc())
    action = request.args.get("action", "")
    if action:
        query = query.where(AuditEvent.action == action[:32])
    user = request.args.get("user", "")
    if user:
        query = query.where(AuditEvent.username == user[:64])
    try:
        limit = min(int(request.args.get("limit", PAGE_SIZE)), 100_000)
    except ValueError:
        abort(400, description="limit must be an integer")
    with common.store().session() as db:
        return list(db.scalars(query.limit(max(1, limit))).all())


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).isoformat(timespec="seconds")


def _csv_cell(value: Any) -> str:
    """A CSV field that a spreadsheet will not run as a formula (OWASP CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@bp.get("/audit")
@role_required(RoleValues.ADMIN)
def index() -> Any:
    return render_template("audit.html", events=_events(), iso=iso)


@bp.get("/audit.csv")
@role_required(RoleValues.ADMIN)
def export() -> Any:
    events = _events()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "time_utc", "user", "action", "target", "detail", "remote_addr"])
    for e in events:
        writer.writerow([e.id, iso(e.at), *(_csv_cell(v) for v in (
            e.username, e.action, e.target, e.detail, e.remote_addr))])
    common.record("export", "audit.csv", f"{len(events)} events")
    return Response(out.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": "attachment; filename=audit.csv"})
