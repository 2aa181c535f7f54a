"""The CytoNode web application: worklist, slide viewer, review, sign-off.

``create_app(settings, store, blueprints=...)`` is the Flask application factory. The node
mounts its own DICOMweb blueprint through ``blueprints`` and serves the whole application on
``CYTONODE_HTTP_PORT`` next to the DICOM SCP (see :mod:`dicom_node.app.web`).
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from flask import Blueprint, Flask, jsonify

from dicom_node.settings import Settings

log = logging.getLogger(__name__)

# Each area is a module with a ``bp`` blueprint; the application registers those present in this list.
BLUEPRINTS: tuple[str, ...] = (
    "viewer.auth",
    "viewer.worklist",
    "viewer.slides",
    "viewer.review",
    "viewer.signoff",
    "viewer.audit",
    "viewer.dmv",
)


def secret_key(settings: Settings) -> str:
    """The session signing key: the setting, else a random key kept (mode 0600) in the data dir."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        return key


def create_app(settings: Settings | None = None, store=None, *,
               blueprints: Sequence[Blueprint] = ()) -> Flask:
    """Build the application for ``settings`` (default: from the environment).

    ``store`` is the node's :class:`dicom_node.store.files.Store` when the app runs inside ``cytonode serve``;
    otherwise the app opens its own on the same data directory and index. ``blueprints`` are
    registered after the viewer's own: the node's DICOMweb (:func:`dicom_node.app.web.make_web_app`),
    which the slide viewer's pages (``viewer.dmv``) read.
    """
    from dicom_node.store.files import Store

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key(settings),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.tls_enabled,  # sent back over HTTPS only
        MAX_CONTENT_LENGTH=2 * 1024 * 1024 * 1024,
    )
    app.extensions["cytonode.settings"] = settings
    app.extensions["cytonode.store"] = store if store is not None else Store(settings)
    from viewer.common import add_security_headers

    app.after_request(add_security_headers)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    for name in BLUEPRINTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # a real missing dependency inside the module
            continue
        app.register_blueprint(module.bp)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    from viewer.models import create_tables

    create_tables(app.extensions["cytonode.store"].engine)
    return app
