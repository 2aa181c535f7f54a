"""Real peers for tests: our node as a subprocess, Orthanc, redis-server, DCMTK tools.

Each starts on loopback ports chosen by binding port 0, and is stopped by the
fixture that started it. Nothing reaches beyond the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HIGHDICOM_FILES = SHARED_DATA / "dicom" / "highdicom_test_files"
BCCD_IMAGES = SHARED_DATA / "bccd" / "BCCD" / "JPEGImages"
CYTONODE = str(Path(sys.executable).with_name("cytonode"))


def free_port() -> int:
    """A free TCP port on loopback (bind to port 0, as pynetdicom's tests do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Path of a peer program; fail under CI (it must be installed there), skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def echo(port: int, *, calling: str = "TESTSCU", called: str = "CYTONODE", timeout: float = 5,
         tls_args: Any = None) -> bool:
    """C-ECHO the node; ``tls_args`` is ``(ssl_context, server_hostname)`` for DICOM TLS."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return getattr(rsp, "Status", None) == 0
    finally:
        assoc.release()


class NodeProcess:
    """``cytonode serve`` in a child process with its own data directory and port."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.data_dir = data_dir
        self.port = int(settings.pop("dicom_port", 0)) or free_port()
        self.http_port = int(settings.pop("http_port", 0)) or free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CYTONODE_")}
        self.env.update({
            "CYTONODE_DATA_DIR": str(data_dir), "CYTONODE_DICOM_PORT": str(self.port),
            "CYTONODE_HTTP_PORT": str(self.http_port),
            "CYTONODE_BIND_ADDRESS": "127.0.0.1", "CYTONODE_STABLE_AGE_S": "1",
            "CYTONODE_WORKERS": "0", "CYTONODE_SHUTDOWN_GRACE_S": "10",
        })
        self.env.update({f"CYTONODE_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"node-{self.port}.log"
        self.tls_args: Any = None  # (ssl_context, server_hostname) when the node runs DICOM TLS

    def start(self, timeout: float = 180) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([CYTONODE, "serve"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if echo(self.port, called=self.env.get("CYTONODE_AE_TITLE", "CYTONODE"),
                        calling=self.env.get("CYTONODE_ALLOWED_AES", "TESTSCU").split(",")[0],
                        timeout=2, tls_args=self.tls_args):
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"node did not answer C-ECHO in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss(self) -> int:
        """The node process's resident set size in bytes (``VmRSS``, Linux)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL the node and any child (worker) it started."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def status(self) -> dict[str, Any]:
        out = subprocess.run([CYTONODE, "status", "--json"], env=self.env, capture_output=True,
                             check=True, timeout=120)
        return json.loads(out.stdout)

    def wait_for(self, predicate: Any, timeout: float = 120, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; last status {json.dumps(status)[:2000]}"
                             f"\nnode log:\n{self.log()[-5000:]}")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class InProcessSCP:
    """The node's SCP (associations, C-ECHO, C-STORE, Q/R) served from this test process on a
    free loopback port: what ``cytonode serve`` answers on its DICOM port, with the same
    settings, store and handlers, but without a process to start (no router, worker, outbox or
    web application). For tests of the DICOM side that need nothing else; a test of the whole
    node uses :class:`NodeProcess`.

    pynetdicom's process-wide flags and the temporary folder that the node sets are put back
    by :meth:`stop`.
    """

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        from dicom_node.settings import Settings

        self.data_dir = data_dir
        self.port = free_port()
        env = {"CYTONODE_DATA_DIR": str(data_dir), "CYTONODE_DICOM_PORT": str(self.port),
               "CYTONODE_BIND_ADDRESS": "127.0.0.1", "CYTONODE_HTTP_ENABLED": "0",
               "CYTONODE_WORKERS": "0", "CYTONODE_SHUTDOWN_GRACE_S": "10"}
        env.update({f"CYTONODE_{k.upper()}": str(v) for k, v in settings.items()})
        self.settings = Settings.from_env(env)
        self.records: list[str] = []

    def start(self) -> InProcessSCP:
        import logging
        import tempfile

        from pynetdicom import _config

        from dicom_node.net.ae import configure_pynetdicom, make_ae
        from dicom_node.store.files import Store

        self._saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET,
                       _config.STORE_SEND_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL)
        configure_pynetdicom(self.settings)
        handler = logging.Handler()
        handler.emit = lambda record: self.records.append(  # type: ignore[method-assign]
            f"{record.levelname} {record.name}: {record.getMessage()}")
        self._handler = handler
        logging.getLogger("dicom_node").addHandler(handler)
        logging.getLogger("dicom_node").setLevel(logging.INFO)
        self.store = Store(self.settings)
        self.ae, handlers = make_ae(self.settings, self.store)
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def log(self) -> str:
        return "\n".join(self.records)

    def status(self) -> dict[str, Any]:
        """What ``cytonode status --json`` would print."""
        from dicom_node.store.overview import node_status

        return json.loads(json.dumps(node_status(self.store)))

    def stop(self) -> None:
        import logging
        import tempfile

        from pynetdicom import _config

        self.server.shutdown()
        self.ae.shutdown()
        self.store.close()
        logging.getLogger("dicom_node").removeHandler(self._handler)
        (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET,
         _config.LOG_HANDLER_LEVEL) = self._saved


class OrthancProcess:
    """Orthanc as the PACS, with its DICOMweb plugin, on free loopback ports."""

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]], aet: str = "ORTHANC") -> None:
        self.binary = require_tool("Orthanc")
        self.workdir = workdir
        self.http_port, self.dicom_port, self.aet = free_port(), free_port(), aet
        workdir.mkdir(parents=True, exist_ok=True)
        plugins = [p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",) if Path(p).exists()]
        self.config = {
            "Name": "cytonode-test-pacs", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "HttpServerEnabled": True,
            "DicomModalities": {},
            "DicomScuTimeout": 30, "Plugins": plugins, "StableAge": 1, "ConcurrentJobs": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        for name, (ae, port) in modalities.items():
            self.config["DicomModalities"][name.lower()] = [ae, "127.0.0.1", port]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> OrthancProcess:
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config))
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("Orthanc exited: " + (self.workdir / "orthanc.log").read_text())
            try:
                if requests.get(self.url + "/system", timeout=2).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def upload(self, path: Path) -> dict[str, Any]:
        rsp = requests.post(self.url + "/instances", data=path.read_bytes(), timeout=120)
        rsp.raise_for_status()
        return dict(rsp.json())

    def find_instance(self, sop_instance_uid: str) -> list[str]:
        rsp = requests.post(self.url + "/tools/find", json={
            "Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}, timeout=30)
        rsp.raise_for_status()
        return list(rsp.json())


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("redis-server")
        self.port = free_port()
        self.workdir = workdir

    def start(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class PostgresProcess:
    """A throw-away PostgreSQL cluster on a free loopback port (trust auth)."""

    def __init__(self, workdir: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            require_tool("initdb")  # fails under CI, skips elsewhere
        self.bindir = bins[-1].parent
        self.workdir = workdir
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.workdir, "postgres")
            os.chmod(self.workdir.parent, 0o755)
        data = self.workdir / "pgdata"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.workdir / "pg.log"), "-w", "-o",
                  f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.workdir / "pgdata"), "-m", "fast", "-w", "stop")
