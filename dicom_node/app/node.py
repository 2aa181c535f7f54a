"""``cytonode serve``: the SCP, the router, the outbox and the embedded worker in one process.

The embedded worker is a child process (``multiprocessing``'s *spawn* start method: a fresh
interpreter, no copy of the node's threads or sockets) whose entry point receives the node's
:class:`~dicom_node.settings.Settings` object itself; a worker started by hand
(``cytonode worker``) reads its settings from the environment.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from dicom_node.jobs.routing import (
    mark_queued,
    pending_jobs,
    requeue_lost_jobs,
    route_stable_series,
)
from dicom_node.jobs.tasks import configure_celery, dispatch
from dicom_node.net.ae import configure_pynetdicom, make_ae
from dicom_node.net.tls import dicom_server_context
from dicom_node.settings import Settings
from dicom_node.store.files import Store
from dicom_node.store.outbox import deliver_due

log = logging.getLogger(__name__)


class _Loop(threading.Thread):
    """Calls ``step`` every ``interval`` seconds until stopped; logs and survives errors."""

    def __init__(self, name: str, step: Callable[[], object], interval: float,
                 stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.step, self.interval, self.stop = step, interval, stop

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except Exception:  # a loop edge: log and go on, never kill the node
                log.exception("%s failed; retrying", self.name)
            self.stop.wait(self.interval)


class Node:
    """A running node. ``start()`` returns once the SCP listens; ``stop()`` shuts down cleanly."""

    def __init__(self, settings: Settings, *, worker_log: Path | None = None) -> None:
        self.settings = settings
        self.worker_log = worker_log  # where the worker child writes (default: our stderr)
        self.stop_event = threading.Event()
        configure_pynetdicom(settings)
        configure_celery(settings)
        self.store = Store(settings)
        self.worker: BaseProcess | None = None
        self.loops: list[_Loop] = []

    def start(self) -> None:
        s = self.settings
        log.info("effective settings: %s", json.dumps(s.redacted(), sort_keys=True))
        removed = self.store.clean_tmp()
        if removed:
            log.warning("removed %d partial files left by an interrupted run", removed)
        self.ae, handlers = make_ae(s, self.store)
        server = self.ae.start_server((s.bind_address, s.dicom_port), block=False,
                                      ssl_context=dicom_server_context(s), evt_handlers=handlers)
        assert server is not None  # block=False returns the server
        self.server = server
        port = self.server.server_address[1]
        log.info("DICOM SCP %s listening on %s:%d%s", s.ae_title, s.bind_address, port,
                 (" (TLS, client certificate required)" if s.tls_require_client_certificate
                  else " (TLS)") if s.tls_enabled else "")
        self.http = None
        if s.http_enabled:
            from dicom_node.app.web import HttpServer  # the web app; imported only when serving it

            self.http = HttpServer(s, self.store)
            self.http.start()
        if s.workers > 0:
            self._start_worker()
        self.loops = [
            _Loop("router", self._route, 0.5, self.stop_event),
            _Loop("outbox", lambda: deliver_due(self.store, s), 1.0, self.stop_event),
        ]
        if s.workers > 0:
            self.loops.append(_Loop("worker-watch", self._watch_worker, 2.0, self.stop_event))
        for loop in self.loops:
            loop.start()

    def _route(self) -> None:
        s = self.settings
        route_stable_series(self.store, s.routing_rules, s.stable_age_s)
        requeue_lost_jobs(self.store, s.job_lease_s, s.job_max_attempts)
        for job_id in pending_jobs(self.store):
            dispatch(job_id)
            mark_queued(self.store, job_id)
            log.info("job %d queued", job_id)

    def _start_worker(self) -> None:
        # The worker runs on exactly these settings, handed over as the object (pickled).
        self.worker = multiprocessing.get_context("spawn").Process(
            target=_embedded_worker, args=(self.settings, self.worker_log),
            name="cytonode-worker")
        self.worker.start()
        log.info("started embedded worker (pid %d)", self.worker.pid)

    def _watch_worker(self) -> None:
        if (self.worker is not None and self.worker.exitcode is not None
                and not self.stop_event.is_set()):
            log.error("embedded worker exited with %s; restarting it", self.worker.exitcode)
            self._start_worker()

    def wait(self) -> None:
        while not self.stop_event.wait(0.5):
            pass

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish (grace period), stop the rest."""
        log.info("shutting down")
        self.stop_event.set()
        self.server.shutdown()  # stops accepting; running associations go on
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.ae.active_associations:
            log.warning("aborting %d associations still active after %.0f s",
                        len(self.ae.active_associations), self.settings.shutdown_grace_s)
        self.ae.shutdown()
        if self.http is not None:
            self.http.stop()
        for loop in self.loops:
            loop.join(timeout=self.settings.network_timeout_s)
        if self.worker is not None and self.worker.exitcode is None:
            self.worker.terminate()  # SIGTERM, Celery's warm shutdown: finishes the running task
            self.worker.join(timeout=self.settings.shutdown_grace_s)
            if self.worker.exitcode is None:
                self.worker.kill()
                self.worker.join()
        self.store.close()
        log.info("stopped")


def serve(settings: Settings) -> int:
    node = Node(settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    node.wait()
    node.stop()
    return 0


def _embedded_worker(settings: Settings, worker_log: Path | None) -> None:
    """The embedded worker's process (spawned by :meth:`Node._start_worker`): a Celery worker on
    ``settings``, writing to ``worker_log`` when given, else to the node's standard error."""
    if worker_log is not None:
        fd = os.open(worker_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    else:
        os.dup2(2, 1)  # Celery prints its banner on stdout; keep the node's stdout for its own output
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    sys.exit(run_worker(settings))


def run_worker(settings: Settings) -> int:
    """``cytonode worker``: a Celery worker consuming analysis jobs."""
    app = configure_celery(settings)
    import dicom_node.jobs.tasks  # noqa: F401  (registers the task)

    argv = ["worker", "--loglevel=INFO", f"--concurrency={max(settings.workers, 1)}",
            "--pool=solo" if settings.workers <= 1 else "--pool=prefork",
            "-Q", "cytonode", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    app.worker_main(argv)
    return 0
