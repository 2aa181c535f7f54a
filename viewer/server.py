"""Runs the web application in a thread of ``cytonode serve`` (werkzeug's threaded WSGI server)."""

from __future__ import annotations

import logging
import threading

from werkzeug.serving import BaseWSGIServer, make_server

from dicom_node.settings import Settings

log = logging.getLogger(__name__)


class HttpServer:
    """The viewer and DICOMweb on ``settings.http_port``; ``start()`` returns once it listens."""

    def __init__(self, settings: Settings, store=None) -> None:
        from viewer import create_app

        self.app = create_app(settings, store)
        self.server: BaseWSGIServer = make_server(settings.bind_address, settings.http_port,
                                                  self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> None:
        self.thread.start()
        log.info("HTTP (viewer, DICOMweb) listening on %s:%d", self.server.host, self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
