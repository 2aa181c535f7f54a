"""Cell review: the gallery, cell crops and heatmaps, reclassify, mark, undo, the live differential."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flask import Blueprint, Response, abort, jsonify, render_template, request, session
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from analysis.classes import CLASS_NAMES
from dicom_node.encode.differential import class_label
from viewer import cases, common
from viewer.auth import login_required, role_required
from viewer.models import CellEdit, CellView, RoleValues
from viewer.slides import CLASS_COLOURS, HEATMAP_LEGEND, colourize, encode_jpeg, open_slide

bp = Blueprint("review", __name__)
bp.before_request(common.check_csrf)

CROP_MARGIN = 0.25  # of the box size, on every side
REVIEWERS = (RoleValues.TECHNOLOGIST, RoleValues.PATHOLOGIST)


def gallery_order(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grouped by class (in class order); in each group flagged cells first, then by uncertainty."""
    order = {name: i for i, name in enumerate(CLASS_NAMES)}
    return sorted(cells, key=lambda c: (c["unclassifiable"], order.get(c["label"], 99),
                                        not c["flagged"], -float(c["uncertainty"])))


def cell_json(cell: dict[str, Any]) -> dict[str, Any]:
    keys = ("cell_id", "x", "y", "bbox", "label", "original_label", "probability", "probabilities",
            "uncertainty", "anomaly_score", "review", "review_reason", "review_reasons",
            "review_labels", "abnormal", "original_abnormal", "abnormal_reason", "unclassifiable",
            "flagged", "changed", "edited", "looked_at", "name")
    return {k: cell.get(k) for k in keys}


def case_json(state: cases.CaseState) -> dict[str, Any]:
    report = state.report().as_json()  # its rows are the "differential" too: computed once
    return {
        "series_instance_uid": state.series_instance_uid,
        "version": state.version,
        "signed": state.signed,
        "classes": list(CLASS_NAMES),
        "class_names": {name: class_label(name) for name in CLASS_NAMES},
        "colours": CLASS_COLOURS,
        "identity": state.identity,
        "cells": [cell_json(c) for c in gallery_order(state.cells)],
        "differential": report["rows"],
        "report": report,
        "unreviewed_flagged": [c["cell_id"] for c in state.unreviewed_flagged()],
        "changes": len(state.changes()),
        "can_undo": any(not e.undone and e.version == state.version for e in state.edits),
    }


@bp.get("/cases/<series_instance_uid>")
@login_required
def gallery(series_instance_uid: str) -> Any:
    state = cases.case_state(common.store(), series_instance_uid)
    common.record("view", series_instance_uid, "review")
    return render_template("review.html", case=state, summary=state.summary,
                           classes=CLASS_NAMES, colours=CLASS_COLOURS,
                           heatmap_legend=HEATMAP_LEGEND)


@bp.get("/api/cases/<series_instance_uid>")
@login_required
def api_case(series_instance_uid: str) -> Any:
    return jsonify(case_json(cases.case_state(common.store(), series_instance_uid)))


def _crop_box(summary: dict[str, Any], cell: dict[str, Any]) -> tuple[int, int, int, int]:
    """The square the classifier saw: its field of view (the result's provenance) around the
    cell's centre, in base-level pixels. Results written before the field carry no field of
    view: the cell's box with a quarter of its size on every side."""
    field_um = summary.get("provenance", {}).get("parameters", {}).get("field_of_view_um")
    spacing_mm = summary.get("slide", {}).get("pixel_spacing_mm")
    if field_um and spacing_mm:
        half = max(1, round(float(field_um) / (float(spacing_mm[0]) * 1000.0) / 2))
        cx, cy = round(float(cell["x"])), round(float(cell["y"]))
        return cx - half, cy - half, 2 * half, 2 * half
    x0, y0, x1, y1 = (int(v) for v in cell["bbox"])
    side = max(x1 - x0, y1 - y0)
    margin = int(side * CROP_MARGIN)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    half = side // 2 + margin
    return cx - half, cy - half, 2 * half, 2 * half


@bp.get("/api/cases/<series_instance_uid>/cells/<int:cell_id>/crop.jpg")
@login_required
def crop(series_instance_uid: str, cell_id: int) -> Any:
    store = common.store()
    state = cases.case_state(store, series_instance_uid)
    cell = state.cell(cell_id)
    slide = open_slide(store, series_instance_uid)
    x, y, w, h = _crop_box(state.summary, cell)
    image = slide.region(x, y, w, h)
    if max(image.size) > 256:
        image.thumbnail((256, 256))
    response = Response(encode_jpeg(image), mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


@bp.get("/api/cases/<series_instance_uid>/cells/<int:cell_id>/heatmap.jpg")
@login_required
def cell_heatmap(series_instance_uid: str, cell_id: int) -> Any:
    """The counterfactual heatmap around one cell: the slide grid cropped to the cell's crop box."""
    store = common.store()
    state = cases.case_state(store, series_instance_uid)
    cell = state.cell(cell_id)
    kind = request.args.get("kind", "counterfactual-evidence")
    arrays = cases.load_heatmaps(store.settings, series_instance_uid)
    grids = {h["kind"]: h for h in state.summary.get("heatmaps", [])}
    if kind not in arrays or kind not in grids:
        abort(404)
    size = int(grids[kind]["cell_size_px"])
    x, y, w, h = _crop_box(state.summary, cell)
    grid = arrays[kind]
    r0, c0 = max(0, y // size), max(0, x // size)
    r1, c1 = min(grid.shape[0], -(-(y + h) // size)), min(grid.shape[1], -(-(x + w) // size))
    if r1 <= r0 or c1 <= c0:
        abort(404)
    patch = np.ascontiguousarray(grid[r0:r1, c0:c1])
    heat = Image.fromarray(colourize(patch), mode="RGBA").resize((128, 128), Image.Resampling.NEAREST)
    # over the cell itself (the grid cells cover the crop box to within one grid cell)
    under = open_slide(store, series_instance_uid).region(
        c0 * size, r0 * size, (c1 - c0) * size, (r1 - r0) * size).convert("RGBA").resize((128, 128))
    image = Image.alpha_composite(under, heat).convert("RGB")
    response = Response(encode_jpeg(image), mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=600"
    return response


@bp.post("/api/cases/<series_instance_uid>/cells/<int:cell_id>/seen")
@role_required(*REVIEWERS)
def seen(series_instance_uid: str, cell_id: int) -> Any:
    """Record that the reviewer looked at the cell (opened or selected it in the review): a
    flagged cell nobody looked at needs the signer's confirmation. Once per user and cell."""
    store = common.store()
    cases.case_state(store, series_instance_uid).cell(cell_id)  # 404 for an unknown case or cell
    with store.session() as db:
        db.add(CellView(series_instance_uid=series_instance_uid, cell_id=cell_id,
                        user_id=session["user_id"], at=time.time()))
        try:
            db.commit()
            first = True
        except IntegrityError:  # this user looked at it before
            db.rollback()
            first = False
    if first:
        common.record("view_cell", f"{series_instance_uid}/{cell_id}", "looked at in the review")
    return jsonify(cell_id=cell_id, looked_at=True)


def _open_case(series_instance_uid: str, cell_id: int | None = None) -> cases.CaseState:
    """The case, 404 if it (or the cell) is unknown, 409 if it is signed."""
    state = cases.case_state(common.store(), series_instance_uid)
    if cell_id is not None:
        state.cell(cell_id)
    if state.signed:
        abort(409, description="the case is signed; open an amendment to change it")
    return state


@bp.post("/api/cases/<series_instance_uid>/cells/<int:cell_id>")
@role_required(*REVIEWERS)
def edit_cell(series_instance_uid: str, cell_id: int) -> Any:
    """Change one cell: JSON or form with ``label`` (a class name), ``abnormal`` or
    ``unclassifiable`` (true/false)."""
    state = _open_case(series_instance_uid, cell_id)
    cell = state.cell(cell_id)
    raw = request.get_json(silent=True) if request.is_json else request.form.to_dict()
    if not isinstance(raw, dict):
        abort(400, description="expected a JSON object or a form")
    payload: dict[str, Any] = raw
    changes: list[tuple[str, str, str]] = []
    if "label" in payload:
        label = payload.get("label")
        if label not in CLASS_NAMES:
            abort(400, description=f"label must be one of {', '.join(CLASS_NAMES)}")
        if label != cell["label"]:
            changes.append(("label", str(cell["label"]), str(label)))
    for flag in ("abnormal", "unclassifiable"):
        if flag in payload:
            value = payload.get(flag)
            if isinstance(value, str):
                if value not in ("true", "false"):
                    abort(400, description=f"{flag} must be true or false")
                value = value == "true"
            if not isinstance(value, bool):
                abort(400, description=f"{flag} must be true or false")
            if value != bool(cell[flag]):
                changes.append((flag, str(bool(cell[flag])).lower(), str(value).lower()))
    if not changes and not any(k in payload for k in ("label", "abnormal", "unclassifiable")):
        abort(400, description="nothing to change: give label, abnormal or unclassifiable")
    now = time.time()
    with common.store().session() as db:
        for field, old, new in changes:
            db.add(CellEdit(series_instance_uid=series_instance_uid, cell_id=cell_id, field=field,
                            old_value=old, new_value=new, version=state.version,
                            user_id=session["user_id"], at=now))
        db.commit()
    for field, old, new in changes:
        common.record("change", f"{series_instance_uid}/{cell_id}", f"{field}: {old} -> {new}")
    return jsonify(case_json(cases.case_state(common.store(), series_instance_uid)))


@bp.post("/api/cases/<series_instance_uid>/undo")
@role_required(*REVIEWERS)
def undo(series_instance_uid: str) -> Any:
    """Undo the latest change of the open version (by anyone); 409 when there is none."""
    state = _open_case(series_instance_uid)
    with common.store().session() as db:
        edit = db.scalar(select(CellEdit).where(
            CellEdit.series_instance_uid == series_instance_uid, CellEdit.undone.is_(False),
            CellEdit.version == state.version).order_by(CellEdit.id.desc()).limit(1))
        if edit is None:
            abort(409, description="nothing to undo")
        edit.undone = True
        target = f"{series_instance_uid}/{edit.cell_id}"
        detail = f"undo {edit.field}: {edit.old_value} -> {edit.new_value}"
        db.commit()
    common.record("undo", target, detail)
    return jsonify(case_json(cases.case_state(common.store(), series_instance_uid)))
