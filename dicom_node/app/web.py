"""The node's web application and the server it runs on inside ``cytonode serve``.

:func:`make_web_app` is the viewer's application (:func:`viewer.create_app`) with the node's
DICOMweb services (:mod:`dicom_node.net.dicomweb`, under ``/dicomweb``) mounted on it.
:class:`HttpServer` runs that application in threads of the node's process on a production WSGI
server (cheroot, the server of CherryPy), over HTTPS when the node has a TLS certificate
(``CYTONODE_TLS_CERTIFICATE``).

Why cheroot: it runs inside the node's process (the viewer shares the node's store and
settings), serves with a fixed pool of worker threads and keep-alive, and speaks TLS itself.
waitress has no TLS; gunicorn forks its own processes. Measured against werkzeug's threaded
development server with ``bench/tiles.py`` (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from flask import Flask

from dicom_node.net.tls import http_server_context
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

#: Worker threads of the web server: concurrent requests in progress (tile viewers fetch ~8 at once).
HTTP_THREADS = 16


def make_web_app(settings: Settings | None = None, store: Any = None) -> Flask:
    """The viewer with the node's DICOMweb under ``/dicomweb``: what ``cytonode serve`` serves.

    Parameters
    ----------
    settings
        The node's settings (default: from the environment, as :func:`viewer.create_app`).
    store
        The node's :class:`dicom_node.store.files.Store`; ``None`` opens one on the same index.
    """
    from dicom_node.net.dicomweb import bp as dicomweb
    from viewer import create_app

    return create_app(settings, store, blueprints=(dicomweb,))


class _DeferredHandshakeAdapter(BuiltinSSLAdapter):
    """cheroot's TLS adapter with the node's own context (:func:`dicom_node.net.tls.http_server_context`),
    whose handshake runs on the request's worker thread at the first read, not in the thread that
    accepts every connection (the context's ``wrap_socket`` defers it): a client that connects
    and sends nothing holds one worker thread until the server's timeout, and nobody else waits
    for it. The WSGI environ names no cipher: there is none before the handshake."""

    def __init__(self, context: ssl.SSLContext) -> None:  # no certificate files: a context
        self.context = context
        self.certificate = self.private_key = self.certificate_chain = self.ciphers = None
        self.private_key_password = None
        self._server_env: dict[str, str] = {}

    def get_environ(self, sock: Any) -> dict[str, str]:  # type: ignore[override]  # cheroot passes the socket
        return {"wsgi.url_scheme": "https", "HTTPS": "on"}


class HttpServer:
    """The viewer and DICOMweb on ``settings.http_port``; ``start()`` returns once it listens."""

    def __init__(self, settings: Settings, store: Any = None) -> None:
        self.app = make_web_app(settings, store)
        self.server = wsgi.Server((settings.bind_address, settings.http_port), self.app,
                                  numthreads=HTTP_THREADS, server_name="cytonode",
                                  timeout=max(1, int(settings.network_timeout_s)))
        context = http_server_context(settings)
        if context is not None:
            self.server.ssl_adapter = _DeferredHandshakeAdapter(context)
        self.server.prepare()  # binds: the port is known (and taken) from here on
        self.thread = threading.Thread(target=self.server.serve, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.bind_addr[1])

    def start(self) -> None:
        self.thread.start()
        scheme = "HTTPS" if self.server.ssl_adapter is not None else "HTTP"
        log.info("%s (viewer, DICOMweb) listening on %s:%d (cheroot, %d threads)", scheme,
                 self.server.bind_addr[0], self.port, HTTP_THREADS)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=5)
