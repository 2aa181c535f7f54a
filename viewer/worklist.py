"""The worklist: one row per slide with patient, study, status and flagged cells."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, jsonify, render_template, request

from viewer import cases, common
from viewer.auth import login_required

bp = Blueprint("worklist", __name__)
bp.before_request(common.check_csrf)

SORT_KEYS = ("received_at", "patient_name", "patient_id", "status", "flagged", "cell_count",
             "study_date", "accession_number")
STATUSES = (cases.RECEIVED, cases.ANALYSING, cases.READY, cases.SIGNED, cases.FAILED)


def filtered_rows() -> list[dict[str, Any]]:
    """Worklist rows filtered by ``status`` and ``q`` (patient, ID, accession, description),
    sorted by ``sort`` (one of :data:`SORT_KEYS`) in ``order`` (asc, desc)."""
    rows = cases.worklist(common.store())
    status = request.args.get("status", "")
    if status:
        if status not in STATUSES:
            abort(400, description=f"status must be one of {', '.join(STATUSES)}")
        rows = [r for r in rows if r["status"] == status]
    query = request.args.get("q", "").strip().lower()
    if query:
        rows = [r for r in rows if any(query in str(r[k]).lower() for k in (
            "patient_name", "patient_id", "accession_number", "study_description",
            "series_description"))]
    sort = request.args.get("sort", "received_at")
    if sort not in SORT_KEYS:
        abort(400, description=f"sort must be one of {', '.join(SORT_KEYS)}")
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        abort(400, description="order must be asc or desc")
    rows.sort(key=lambda r: (r[sort] is None, r[sort] if r[sort] is not None else 0),
              reverse=order == "desc")
    return rows


@bp.get("/")
@login_required
def index() -> Any:
    return render_template("worklist.html", statuses=STATUSES, sort_keys=SORT_KEYS)


@bp.get("/api/worklist")
@login_required
def api_worklist() -> Any:
    return jsonify(cases=filtered_rows())
