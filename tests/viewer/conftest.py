"""One real node for the viewer tests: the sample slide arrives by C-STORE and is analysed once.

The node (``cytonode serve``, one embedded worker) sends what it makes to a stand-in PACS (a
pynetdicom storage SCP). The Flask test client runs an app on the same data directory and
index, so a sign-off made through it is delivered by the node's outbox.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from dicom_node.app.demo import SAMPLE_SLIDE, StandInPACS, send_files
from dicom_node.settings import Destination, Settings
from tests.peers import CYTONODE, NodeProcess

PASSWORD = "correct horse battery"
USERS = {"tech": "technologist", "path": "pathologist", "admin": "admin"}


@dataclass
class NodeCase:
    node: NodeProcess
    pacs: StandInPACS
    settings: Settings
    series_instance_uid: str
    study_instance_uid: str
    job: dict


@pytest.fixture(scope="session")
def node_case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCase]:
    root = tmp_path_factory.mktemp("viewer")
    (root / "pacs").mkdir()
    pacs = StandInPACS(root / "pacs")
    node = NodeProcess(root / "node", workers=1, outbox_retry_initial_s=0.5,
                       destinations=f"DEMOPACS@127.0.0.1:{pacs.port}")
    try:
        node.start()
        send_files(sorted(SAMPLE_SLIDE.glob("*.dcm")), node.port, "CYTONODE")
        status = node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] in ("done", "failed"),
                               timeout=900, what="the sample slide's analysis")
        job = status["jobs"][0]
        assert job["state"] == "done", job.get("error")
        env = dict(node.env)
        for name, role in USERS.items():
            subprocess.run([CYTONODE, "user", "add", name, "--role", role, "--password-stdin"],
                           input=PASSWORD + "\n", env=env, check=True, capture_output=True,
                           text=True, timeout=120)
        settings = Settings(data_dir=node.data_dir,
                            destinations=(Destination("DEMOPACS", "127.0.0.1", pacs.port),))
        series = job["series_instance_uid"]
        study = next(s["study_instance_uid"] for s in status["series"]
                     if s["series_instance_uid"] == series)
        yield NodeCase(node, pacs, settings, series, study, job)
    finally:
        node.cleanup()
        pacs.stop()


@pytest.fixture(scope="session")
def app(node_case: NodeCase) -> Flask:
    from dicom_node.app.web import make_web_app

    return make_web_app(node_case.settings)


def login_form_token(client: FlaskClient) -> str:
    """Open the login form; return the CSRF token its post needs."""
    client.get("/login")
    with client.session_transaction() as sess:
        return str(sess["csrf_token"])


def login(client: FlaskClient, username: str, password: str = PASSWORD) -> str:
    """Log in through the form (with its CSRF token); return the session's CSRF token."""
    token = login_form_token(client)
    rsp = client.post("/login", data={"username": username, "password": password,
                                      "csrf_token": token})
    assert rsp.status_code == 302, rsp.get_data(as_text=True)[:500]
    with client.session_transaction() as sess:
        return str(sess["csrf_token"])


@pytest.fixture
def client_as(app: Flask):
    """Factory: a test client logged in as one of :data:`USERS`, and its CSRF token."""
    def factory(username: str) -> tuple[FlaskClient, str]:
        client = app.test_client()
        return client, login(client, username)
    return factory


def wait_for_pacs(pacs: StandInPACS, sop_instance_uid: str, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    path = pacs.folder / f"{sop_instance_uid}.dcm"
    while time.monotonic() < deadline:
        if path.exists() and any(uid == sop_instance_uid for _, uid in pacs.received):
            return path
        time.sleep(0.3)
    raise AssertionError(f"{sop_instance_uid} did not reach the stand-in PACS in {timeout} s; "
                         f"it has {pacs.received}")


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and Path(candidate).exists():
            return candidate
    return None
