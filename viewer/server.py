"""Runs the web application in a thread of ``cytonode serve`` (werkzeug's threaded WSGI server),
over HTTPS when the node has a TLS certificate (``CYTONODE_TLS_CERTIFICATE``)."""

from __future__ import annotations

import logging
import threading

from werkzeug.serving import BaseWSGIServer, make_server

from dicom_node.settings import Settings
from dicom_node.tls import http_server_context

log = logging.getLogger(__name__)


class HttpServer:
    """The viewer and DICOMweb on ``settings.http_port``; ``start()`` returns once it listens."""

    def __init__(self, settings: Settings, store=None) -> None:
        from viewer import create_app

        self.app = create_app(settings, store)
        self.server: BaseWSGIServer = make_server(settings.bind_address, settings.http_port,
                                                  self.app, threaded=True,
                                                  ssl_context=http_server_context(settings))
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> None:
        self.thread.start()
        scheme = "HTTPS" if self.server.ssl_context is not None else "HTTP"
        log.info("%s (viewer, DICOMweb) listening on %s:%d", scheme, self.server.host, self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
