"""Sign-off (pathologists, password re-entered): the verified final SR, stored and sent by the outbox.

A signed version is read-only; an amendment opens the next version, whose signature issues a new
final SR that names the earlier one as its predecessor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import pydicom
from flask import Blueprint, abort, jsonify, redirect, render_template, request, session, url_for
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from dicom_node.encode.common import cell_tracking_uid
from dicom_node.encode.final_sr import ReviewedCell, encode_final_report
from dicom_node.store import queries
from dicom_node.store.files import Store
from dicom_node.store.outbox import enqueue, release_when_signed
from viewer import cases, common
from viewer.auth import login_required, role_required, verify_password
from viewer.models import CaseVersion, RoleValues, User

log = logging.getLogger(__name__)

bp = Blueprint("signoff", __name__)
bp.before_request(common.check_csrf)

DEFAULT_ORGANIZATION = "CytoNode"


def _stored_dataset(store: Store, sop_instance_uid: str, *, pixels: bool = True) -> pydicom.Dataset:
    path = queries.instance_path(store, sop_instance_uid)
    if path is None:
        abort(409, description=f"object {sop_instance_uid} of the analysis is not in the store")
    return pydicom.dcmread(path, stop_before_pixels=not pixels)


def _tracking_uid(summary: dict[str, Any], cell_id: int) -> str:
    """The cell's Tracking UID as the preliminary objects have it, from the stored summary."""
    slide = summary["slide"]
    return cell_tracking_uid(int(cell_id), series_instance_uid=slide["series_instance_uid"],
                             sop_instance_uids=slide["sop_instance_uids"],
                             weights_sha256=summary["provenance"]["weights_sha256"])


def _slide_sources(store: Store, series_instance_uid: str) -> list[pydicom.Dataset]:
    """The slide's stored VL Whole Slide Microscopy instances, headers only: read once per
    signature, for the final SR and the final PDF."""
    paths = queries.slide_files(store, series_instance_uid).paths
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def build_final_report(store: Store, state: cases.CaseState, user: User, version: int,
                       previous_finals: list[pydicom.Dataset], sources: Sequence[pydicom.Dataset], *,
                       confirmed_unreviewed: bool = False) -> Any:
    """The final SR; ``sources`` are the slide's images (:func:`_slide_sources`)."""
    summary = state.summary
    preliminary = _stored_dataset(store, summary["files"]["sr"]["sop_instance_uid"])
    organization = (user.organization or str(sources[0].get("InstitutionName") or "")
                    or DEFAULT_ORGANIZATION)
    cells = [ReviewedCell(
        cell_id=int(c["cell_id"]), bbox=tuple(int(v) for v in c["bbox"]),  # type: ignore[arg-type]
        original_label=c["original_label"], label=c["label"],
        original_abnormal=bool(c["original_abnormal"]), abnormal=bool(c["abnormal"]),
        unclassifiable=bool(c["unclassifiable"]), tracking_uid=_tracking_uid(summary, c["cell_id"]),
        flagged=bool(c["flagged"]), looked_at=bool(c["looked_at"]))
        for c in state.cells]
    return encode_final_report(
        preliminary, sources, cells,
        # a one-component name gets its trailing caret (PS3.5 6.2.1.2): "path" -> "path^"
        verifying_observer_name=user.person_name or f"{user.username}^",
        verifying_organization=organization, version=version, previous_finals=previous_finals,
        platelets_detected=summary.get("platelets_detected"), confirmed_unreviewed=confirmed_unreviewed,
        params=store.settings.encoder.params())


# --- issue 20 (3): the final PDF report next to the final SR ---
def build_final_pdf(state: cases.CaseState, report: Any, sources: Sequence[pydicom.Dataset],
                    unreviewed: Sequence[int] = ()) -> pydicom.Dataset:
    """The final, verified Encapsulated PDF report that goes with the final SR ``report``: the
    same signer, time and version, the reviewed differential (dicom_node.encode.pdf);
    ``sources`` as for :func:`build_final_report`."""
    from pydicom.valuerep import DT

    from dicom_node.encode.pdf import Verification, encode_final_pdf_report

    observer = report.VerifyingObserverSequence[0]
    verification = Verification(
        observer_name=str(observer.VerifyingObserverName),
        organization=str(observer.VerifyingOrganization),
        verified_at=DT(str(observer.VerificationDateTime)), version=int(report.InstanceNumber),
        changed_cells=len(state.changes()), unreviewed_flagged=tuple(unreviewed))
    return encode_final_pdf_report(state.summary, state.cells, sources, verification,
                                   common.settings().encoder.params(), final_report=report)
# --- end issue 20 (3) ---


@bp.get("/cases/<series_instance_uid>/signoff")
@role_required(RoleValues.PATHOLOGIST)
def form(series_instance_uid: str) -> Any:
    state = cases.case_state(common.store(), series_instance_uid)
    return render_template("signoff.html", case=state, summary=state.summary, error="")


@bp.post("/cases/<series_instance_uid>/signoff")
@role_required(RoleValues.PATHOLOGIST)
def sign(series_instance_uid: str) -> Any:
    """Sign the open version: check the password, issue the final SR and the final PDF report,
    queue them (and, under the final-only release policy, the preliminary objects) for every
    destination."""
    store = common.store()
    state = cases.case_state(store, series_instance_uid)
    if state.signed:
        abort(409, description="this version of the case is signed already")
    user_id = session["user_id"]
    if not verify_password(store, user_id, request.form.get("password", "")):
        common.record("sign_refused", series_instance_uid, "wrong password")
        return render_template("signoff.html", case=state, summary=state.summary,
                               error="Wrong password: the case was not signed."), 403
    # Flagged cells nobody looked at: only with the signer's explicit confirmation (recorded).
    unreviewed = [c["cell_id"] for c in state.unreviewed_flagged()]
    confirmed = bool(unreviewed) and request.form.get("confirm_unreviewed") == "yes"
    if unreviewed and not confirmed:
        common.record("sign_refused", series_instance_uid,
                      f"{len(unreviewed)} flagged cells not reviewed, not confirmed")
        n = len(unreviewed)
        return render_template("signoff.html", case=state, summary=state.summary, error=(
            f"{n} flagged cell{'s' if n != 1 else ''} not reviewed: confirm that you sign without "
            "reviewing them, or review them first. The case was not signed.")), 409
    version = state.version
    now = time.time()
    with store.session() as db:
        user = db.get(User, user_id)
        if user is None:
            abort(403)
        if not state.versions:
            db.add(CaseVersion(series_instance_uid=series_instance_uid, version=1, opened_at=now))
            try:
                db.commit()
            except IntegrityError:  # a concurrent first signature made the row: the claim below decides
                db.rollback()
        claimed = db.execute(update(CaseVersion).where(
            CaseVersion.series_instance_uid == series_instance_uid, CaseVersion.version == version,
            CaseVersion.signed_at.is_(None)).values(signed_at=now, signed_by=user_id))
        db.commit()
        if not getattr(claimed, "rowcount", 0):
            abort(409, description="this version of the case is signed already")
    try:
        previous = [_stored_dataset(store, v.sr_sop_instance_uid)
                    for v in state.versions if v.version < version and v.sr_sop_instance_uid]
        sources = _slide_sources(store, series_instance_uid)
        report = build_final_report(store, state, user, version, previous, sources,
                                    confirmed_unreviewed=confirmed)
        final_pdf = build_final_pdf(state, report, sources, unreviewed)  # issue 20 (3)
        stored = store.add_dataset(report)
        stored_pdf = store.add_dataset(final_pdf)  # issue 20 (3)
    except BaseException:
        with store.session() as db:  # release the claim: the case stays open
            db.execute(update(CaseVersion).where(
                CaseVersion.series_instance_uid == series_instance_uid,
                CaseVersion.version == version).values(signed_at=None, signed_by=None))
            db.commit()
        raise
    with store.session() as db:
        db.execute(update(CaseVersion).where(
            CaseVersion.series_instance_uid == series_instance_uid, CaseVersion.version == version)
            .values(sr_sop_instance_uid=stored.sop_instance_uid))
        db.commit()
    queued = [entry["sop_instance_uid"] for entry in state.summary.get("files", {}).values()]
    for uid in release_when_signed(queued, [stored.sop_instance_uid, stored_pdf.sop_instance_uid]):
        enqueue(store, uid)  # adds nothing for objects already queued (immediate release policy)
    if unreviewed:
        common.record("sign_unreviewed", series_instance_uid,
                      f"version {version}: signed with {len(unreviewed)} flagged cells not reviewed "
                      f"(confirmed by the signer): cells {', '.join(map(str, unreviewed))}")
    common.record("sign", series_instance_uid,
                  f"version {version}, final SR {stored.sop_instance_uid}, "
                  f"{len(state.changes())} cells changed, "
                  f"{len(unreviewed)} flagged cells not reviewed")
    if request.accept_mimetypes.best == "application/json":
        return jsonify(version=version, sop_instance_uid=stored.sop_instance_uid,
                       pdf_sop_instance_uid=stored_pdf.sop_instance_uid)
    return redirect(url_for("signoff.form", series_instance_uid=series_instance_uid))


@bp.post("/cases/<series_instance_uid>/amend")
@role_required(RoleValues.PATHOLOGIST)
def amend(series_instance_uid: str) -> Any:
    """Open the next version of a signed case (the signed one stays as it was)."""
    store = common.store()
    state = cases.case_state(store, series_instance_uid)
    if not state.signed:
        abort(409, description="only a signed case can be amended")
    reason = request.form.get("reason", "").strip()
    if not reason:
        abort(400, description="an amendment needs a reason")
    with store.session() as db:
        db.add(CaseVersion(series_instance_uid=series_instance_uid, version=state.version + 1,
                           opened_at=time.time(), opened_by=session["user_id"],
                           reason=reason[:2000]))
        try:
            db.commit()
        except IntegrityError:  # the unique (series, version) row exists: someone amended first
            db.rollback()
            abort(409, description="an amendment is open already")
    common.record("amend", series_instance_uid, f"version {state.version + 1}: {reason[:200]}")
    return redirect(url_for("review.gallery", series_instance_uid=series_instance_uid))


@bp.get("/api/cases/<series_instance_uid>/versions")
@login_required
def versions(series_instance_uid: str) -> Any:
    store = common.store()
    state = cases.case_state(store, series_instance_uid)
    with store.session() as db:
        names = {u.id: u.username for u in db.scalars(select(User)).all()}
    return jsonify(versions=[{
        "version": v.version, "opened_at": v.opened_at, "reason": v.reason,
        "signed_by": names.get(v.signed_by) if v.signed_by else None, "signed_at": v.signed_at,
        "sr_sop_instance_uid": v.sr_sop_instance_uid or None} for v in state.versions])
