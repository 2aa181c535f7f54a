"""Helpers every blueprint uses: the node's store and settings, CSRF, the audit trail, HTTP errors."""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any

from flask import Response, abort, current_app, g, jsonify, render_template, request, session
from werkzeug.exceptions import HTTPException

from dicom_node.encode.differential import class_label
from dicom_node.settings import Settings
from dicom_node.store.files import Store
from viewer.models import AuditEvent

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: The one inline style the pages need: the ``<style>`` element OpenSeadragon (6.1) adds to the
#: page on start (it hides the focus outline on touch screens). Allowed by its hash, not by
#: 'unsafe-inline'; the pages themselves have no inline script, style element or style attribute.
OPENSEADRAGON_STYLE = ("@media (hover: none) {    .openseadragon-canvas:focus {        "
                       "outline: none !important;    }}")
OPENSEADRAGON_STYLE_HASH = "sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE="

#: Scripts, styles, tiles and API calls all come from the node itself. ``blob:`` images: OpenSeadragon
#: may turn a fetched tile into a blob URL before drawing it on its canvas.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    f"style-src 'self' '{OPENSEADRAGON_STYLE_HASH}'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def store() -> Store:
    return current_app.extensions["cytonode.store"]  # type: ignore[no-any-return]


def settings() -> Settings:
    return current_app.extensions["cytonode.settings"]  # type: ignore[no-any-return]


def csrf_token() -> str:
    """The session's CSRF token, made on first use."""
    token = session.get("csrf_token")
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session["csrf_token"] = token
    return token


def check_csrf() -> None:
    """``before_request`` of each blueprint: refuse a state-changing request without the token.

    The token comes from the form field ``csrf_token`` or the header ``X-CSRF-Token``.
    """
    if request.method not in UNSAFE_METHODS:
        return
    expected = session.get("csrf_token")
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    if not isinstance(expected, str) or not expected or not hmac.compare_digest(
            expected.encode(), sent.encode()):
        abort(400, description="CSRF token missing or wrong")


def add_security_headers(response: Response) -> Response:
    """``after_request`` of the application: every response, pages, API, files and errors alike."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def remote_addr() -> str:
    return (request.remote_addr or "")[:64]


def record(action: str, target: str = "", detail: str = "", *, user_id: int | None = None,
           username: str | None = None) -> None:
    """Append one event to the audit log (its own transaction)."""
    if user_id is None:
        user_id = session.get("user_id")
    if username is None:
        username = session.get("username", "")
    with store().session() as db:
        db.add(AuditEvent(at=time.time(), user_id=user_id, username=str(username)[:64],
                          action=action[:32], target=target[:128], detail=detail,
                          remote_addr=remote_addr()))
        db.commit()


def wants_json() -> bool:
    return request.path.startswith("/api/")


def handle_http_error(exc: HTTPException) -> Any:
    """JSON on ``/api/`` routes, a plain page elsewhere; never a stack trace (STYLE.md 4)."""
    code = exc.code or 500
    if wants_json():
        response = jsonify(error=exc.name, code=code, description=exc.description)
    else:
        response = current_app.make_response(
            (render_template("error.html", code=code, name=exc.name, description=exc.description),
             code))
    response.status_code = code
    if code == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def current_user_id() -> int:
    uid = session.get("user_id")
    if not isinstance(uid, int):
        abort(401)
    return uid


def context() -> dict[str, Any]:
    """Template globals: the CSRF token, who is logged in, class names in words."""
    return {"csrf_token": csrf_token, "current_username": session.get("username"),
            "current_role": session.get("role"), "g": g, "class_label": class_label}
