"""Accounts: login, logout, roles, CSRF, throttled failed logins, user administration.

The session holds ``user_id`` (int), ``username``, ``role`` and ``csrf_token``; the DICOMweb
blueprint relies on those names. It also holds ``sid``, a random id that logout revokes
server-side (the cookie itself is only signed, so a saved copy would otherwise outlive logout).
Passwords are stored as werkzeug scrypt hashes.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import delete, func, select
from werkzeug.exceptions import HTTPException
from werkzeug.security import check_password_hash, generate_password_hash

from dicom_node.store.files import Store
from viewer import common
from viewer.models import LoginFailure, RevokedSession, RoleValues, User

bp = Blueprint("auth", __name__)
bp.before_request(common.check_csrf)
bp.app_errorhandler(HTTPException)(common.handle_http_error)
bp.app_context_processor(common.context)

F = TypeVar("F", bound=Callable[..., Any])

#: Failed logins of one account (or from one address) within THROTTLE_WINDOW_S that lock it out.
MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
THROTTLE_WINDOW_S = 15 * 60
USERNAME_MAX = 64
_DUMMY_HASH = generate_password_hash("no account has this password")


def validate_username(name: str) -> str:
    """A user name: 1-64 printable characters without ``^`` or ``\\`` (it becomes a DICOM PN)."""
    if not isinstance(name, str) or not 1 <= len(name) <= USERNAME_MAX or not name.isprintable() \
            or any(c in name for c in "^\\=") or name != name.strip():
        raise ValueError("user name must be 1-64 printable characters without ^, \\ or =, "
                         "and without surrounding spaces")
    return name


def add_user(store: Store, name: str, role: str | RoleValues, password: str,
             organization: str = "", person_name: str = "") -> int:
    """Create an account; return its id.

    Raises
    ------
    ValueError
        Bad name, unknown role, a password under 8 characters, or the name is taken.
    """
    role = RoleValues(role)
    validate_username(name)
    if not isinstance(password, str) or len(password) < 8:
        raise ValueError("password must have at least 8 characters")
    if len(person_name) > 324 or "\\" in person_name or not person_name.isprintable():
        raise ValueError("person name must be a DICOM PN (Family^Given), at most 324 characters")
    with store.session() as db:
        if db.scalar(select(User).where(User.username == name)) is not None:
            raise ValueError(f"user {name!r} exists already")
        user = User(username=name, password_hash=generate_password_hash(password), role=role.value,
                    organization=organization[:64], person_name=person_name,
                    created_at=time.time())
        db.add(user)
        db.commit()
        return int(user.id)


def verify_password(store: Store, user_id: int, password: str) -> bool:
    with store.session() as db:
        user = db.get(User, user_id)
        return bool(user is not None and user.active
                    and check_password_hash(user.password_hash, password))


def login_required(view: F) -> F:
    """Refuse (401 JSON on /api/, else a redirect to the login page) without a logged-in user."""
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not isinstance(session.get("user_id"), int):
            if common.wants_json() or request.method != "GET":
                abort(401)
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)
    return wrapped  # type: ignore[return-value]


def role_required(*roles: str | RoleValues) -> Callable[[F], F]:
    """Like :func:`login_required`, and the user's role must be one of ``roles`` (else 403)."""
    allowed = {RoleValues(r).value for r in roles}

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if session.get("role") not in allowed:
                abort(403)
            return view(*args, **kwargs)
        return login_required(wrapped)  # type: ignore[return-value]
    return decorator


def _safe_next(target: str | None) -> str:
    """Only a local path may be the redirect after login (no open redirect)."""
    if not target:
        return url_for("worklist.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") \
            or "\\" in target:
        return url_for("worklist.index")
    return target


def _throttled(username: str) -> bool:
    since = time.time() - THROTTLE_WINDOW_S
    with common.store().session() as db:
        by_user = db.scalar(select(func.count()).select_from(LoginFailure).where(
            LoginFailure.username == username, LoginFailure.at >= since)) or 0
        by_addr = db.scalar(select(func.count()).select_from(LoginFailure).where(
            LoginFailure.remote_addr == common.remote_addr(), LoginFailure.at >= since)) or 0
    return by_user >= MAX_FAILURES_PER_USER or by_addr >= MAX_FAILURES_PER_ADDRESS


@bp.before_app_request
def check_session() -> None:
    """Every request: a logged-in session must carry a ``sid`` that logout has not revoked."""
    if "user_id" not in session:
        return
    sid = session.get("sid")
    if isinstance(sid, str) and sid:
        with common.store().session() as db:
            if db.get(RevokedSession, sid) is None:
                return
    session.clear()  # revoked, or made before sessions had an id: log in again


def _revoke_session() -> None:
    """Revoke the current session's ``sid``; forget revocations older than any valid cookie."""
    sid = session.get("sid")
    if not isinstance(sid, str) or not sid:
        return
    now = time.time()
    lifetime = current_app.permanent_session_lifetime.total_seconds()
    with common.store().session() as db:
        # Flask refuses a cookie signed longer than the lifetime ago, so older rows are moot.
        db.execute(delete(RevokedSession).where(RevokedSession.revoked_at < now - lifetime))
        if db.get(RevokedSession, sid) is None:
            db.add(RevokedSession(sid=sid, user_id=session.get("user_id"), revoked_at=now))
        db.commit()


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = ""
    status = 200
    if request.method == "POST":
        username = request.form.get("username", "")[:USERNAME_MAX]
        password = request.form.get("password", "")
        if _throttled(username):
            common.record("login_throttled", username, user_id=None, username=username)
            error, status = "Too many failed logins; try again in 15 minutes.", 429
        else:
            with common.store().session() as db:
                user = db.scalar(select(User).where(User.username == username))
                # hash either way, so the time taken does not tell whether the account exists
                stored = user.password_hash if user is not None else _DUMMY_HASH
                ok = check_password_hash(stored, password) and user is not None and user.active
                if not ok:
                    db.add(LoginFailure(username=username, remote_addr=common.remote_addr(),
                                        at=time.time()))
                    db.commit()
            if ok:
                assert user is not None
                session.clear()  # a fresh session: no fixation
                session["user_id"] = int(user.id)
                session["username"] = user.username
                session["role"] = user.role
                session["sid"] = secrets.token_urlsafe(32)
                common.csrf_token()
                common.record("login", user.username)
                return redirect(_safe_next(request.args.get("next")))
            common.record("login_failed", username, user_id=None, username=username)
            error, status = "Wrong user name or password.", 401
    return render_template("login.html", error=error), status


@bp.post("/logout")
@login_required
def logout() -> Any:
    common.record("logout")
    _revoke_session()
    session.clear()
    return redirect(url_for("auth.login"))


@bp.get("/api/me")
@login_required
def me() -> Any:
    return jsonify(user_id=session["user_id"], username=session["username"], role=session["role"],
                   csrf_token=common.csrf_token())


@bp.route("/admin/users", methods=["GET", "POST"])
@role_required(RoleValues.ADMIN)
def users() -> Any:
    message, status = "", 200
    if request.method == "POST":
        name = request.form.get("username", "")
        try:
            add_user(common.store(), name, request.form.get("role", ""),
                     request.form.get("password", ""), request.form.get("organization", ""))
        except ValueError as exc:
            message, status = str(exc), 400
        else:
            common.record("user_add", name[:64], f"role {request.form.get('role')}")
            message = f"User {name} created."
    with common.store().session() as db:
        rows = db.scalars(select(User).order_by(User.username)).all()
    return render_template("users.html", users=rows, roles=[r.value for r in RoleValues],
                           message=message), status


def run_user_add(args: Any) -> int:
    """Run ``cytonode user add`` (registered in :mod:`dicom_node.app.commands`)."""
    import sys

    from dicom_node.settings import Settings
    from viewer.models import create_tables

    password = sys.stdin.readline().rstrip("\r\n")
    store = Store(Settings.from_env())
    try:
        create_tables(store.engine)
        user_id = add_user(store, args.name, args.role, password, args.organization,
                           args.person_name)
    finally:
        store.close()
    sys.stdout.write(f"user {args.name} ({args.role}) created, id {user_id}\n")
    return 0
