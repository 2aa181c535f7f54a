"""DICOM TLS both ways with DCMTK (``storescu`` and ``storescp --enable-tls``) and HTTPS for the
viewer: certificates made at run time with the ``openssl`` command line."""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
from pydicom import Dataset, dcmread

from dicom_node.settings import Destination, Settings
from dicom_node.store.files import Store
from dicom_node.store.outbox import deliver_due, enqueue
from tests.peers import NodeProcess, echo, free_port, require_tool

SLIDE = sorted((Path(__file__).resolve().parents[2] / "dicom_node" / "data" / "sample_slide").glob("*.dcm"))
PASSWORD = "a long test password"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(pki: Path, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    """``name.key`` and ``name.pem``, signed by ``ca``."""
    (pki / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=pki)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA; the node's certificate (127.0.0.1 and localhost, server and client use);
    a client certificate for storescu."""
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-sha256", "-subj", "/CN=CytoNode Test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=pki)
    _issue(pki, "node", "/CN=localhost",
           "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
           "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _issue(pki, "client", "/CN=TESTSCU",
           "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
           "extendedKeyUsage=clientAuth\n")
    return pki


def _tls_args(pki: Path, *, client_certificate: bool = True) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client_certificate:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context, "127.0.0.1"


def _storescu(pki: Path, port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("storescu"), *tls, "+cf", str(pki / "ca.pem"),
                           "-aet", "TESTSCU", "-aec", "CYTONODE", "-R", "-xy",
                           "127.0.0.1", str(port), *map(str, SLIDE)],
                          capture_output=True, text=True, timeout=120, check=False)


def _with_client_certificate(pki: Path) -> tuple[str, ...]:
    return "--enable-tls", str(pki / "client.key"), str(pki / "client.pem")


def _instances(node: NodeProcess) -> int:
    return sum(s["instances"] for s in node.status()["series"])


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path):
    """Factory: a ``cytonode serve`` with the node's certificate; stopped at the end."""
    nodes: list[NodeProcess] = []

    def factory(name: str = "node", **settings: object) -> NodeProcess:
        node = NodeProcess(tmp_path / name, allowed_aes="TESTSCU", tls_certificate=pki / "node.pem",
                           tls_key=pki / "node.key", tls_ca=pki / "ca.pem", **settings)
        node.tls_args = _tls_args(pki)
        nodes.append(node)
        return node.start()

    yield factory
    for node in nodes:
        node.cleanup()


def test_storescu_stores_a_slide_over_tls_and_plain_tcp_is_refused(tls_node, pki: Path) -> None:
    node = tls_node()
    # An idle TCP connection (no ClientHello) holds no one else up: the handshake runs on the
    # connection's own thread.
    with socket.create_connection(("127.0.0.1", node.port)):
        out = _storescu(pki, node.port, *_with_client_certificate(pki))
        assert out.returncode == 0, out.stdout + out.stderr
    assert _instances(node) == len(SLIDE)
    # Without TLS: storescu and pynetdicom get no association.
    plain = _storescu(pki, node.port)
    assert plain.returncode != 0
    assert not echo(node.port, timeout=5)
    assert _instances(node) == len(SLIDE)
    assert "TLS handshake failed" in node.log()
    assert "Traceback" not in node.log()


def test_client_certificate_required(tls_node, pki: Path) -> None:
    node = tls_node(tls_require_client_certificate=True)
    anonymous = _storescu(pki, node.port, "--anonymous-tls")
    assert anonymous.returncode != 0
    assert _instances(node) == 0
    assert not echo(node.port, timeout=5, tls_args=_tls_args(pki, client_certificate=False))
    assert "TLS handshake failed (PEER_DID_NOT_RETURN_A_CERTIFICATE)" in node.log()
    out = _storescu(pki, node.port, *_with_client_certificate(pki))
    assert out.returncode == 0, out.stdout + out.stderr
    assert _instances(node) == len(SLIDE)


def _storescp_tls(pki: Path, port: int, received: Path) -> subprocess.Popen[str]:
    """storescp over TLS; it requires the node's certificate (-rc) and checks it against the CA."""
    received.mkdir()
    return subprocess.Popen([require_tool("storescp"), "--enable-tls", str(pki / "node.key"),
                             str(pki / "node.pem"), "+cf", str(pki / "ca.pem"), "--require-peer-cert",
                             "-aet", "STORESCP", "+xa", "-od", str(received), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_outbox_delivers_over_tls_to_storescp(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    received = tmp_path / "received"
    scp = _storescp_tls(pki, port, received)
    settings = Settings(data_dir=tmp_path / "node", tls_certificate=str(pki / "node.pem"),
                        tls_key=str(pki / "node.key"), tls_ca=str(pki / "ca.pem"),
                        destinations=(), outbox_retry_initial_s=0.2, outbox_retry_max_s=1)
    settings = dataclasses.replace(settings, destinations=(Destination.parse(f"STORESCP@127.0.0.1:{port}+tls"),))
    assert settings.destinations[0].tls
    store = Store(settings)
    try:
        stored = store.ingest_file(SLIDE[0], routing="local")
        assert enqueue(store, stored.sop_instance_uid) == 1
        deadline = time.monotonic() + 30
        delivered = 0
        while not delivered and time.monotonic() < deadline:
            delivered = deliver_due(store, settings, now=time.time() + 60)
            time.sleep(0.3)
        assert delivered == 1
    finally:
        store.close()
        scp.terminate()
        scp_log = scp.communicate(timeout=30)[0]
    files = list(received.iterdir())
    assert len(files) == 1, scp_log
    assert dcmread(files[0]).SOPInstanceUID == stored.sop_instance_uid


def test_c_move_to_a_tls_destination(tls_node, pki: Path, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    port = free_port()
    scp = _storescp_tls(pki, port, tmp_path / "moved")
    node = tls_node(move_destinations=f"STORESCP@127.0.0.1:{port}+tls")
    try:
        out = _storescu(pki, node.port, *_with_client_certificate(pki))
        assert out.returncode == 0, out.stdout + out.stderr
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CYTONODE", tls_args=_tls_args(pki))
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = dcmread(SLIDE[0], stop_before_pixels=True).StudyInstanceUID
        statuses = [getattr(rsp, "Status", None) for rsp, _ in
                    assoc.send_c_move(query, "STORESCP", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
        assert statuses[-1] == 0, (statuses, node.log()[-3000:])
    finally:
        scp.terminate()
        scp_log = scp.communicate(timeout=30)[0]
    assert len(list((tmp_path / "moved").iterdir())) == len(SLIDE), scp_log


def test_viewer_over_https_with_secure_session_cookie(tls_node, pki: Path) -> None:
    from viewer.auth import add_user

    node = tls_node()
    url = f"https://127.0.0.1:{node.http_port}"
    deadline = time.monotonic() + 60  # the web app starts after the SCP answers
    while "HTTPS (viewer, DICOMweb) listening" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", node.http_port)):  # idle: blocks no one
        assert requests.get(url + "/login", verify=str(pki / "ca.pem"), timeout=10).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{node.http_port}/login", timeout=10)
    store = Store(Settings.from_env(node.env))
    try:
        add_user(store, "reader", "pathologist", PASSWORD)
    finally:
        store.close()
    ca = str(pki / "ca.pem")  # per request: REQUESTS_CA_BUNDLE would override Session.verify
    client = requests.Session()
    form = client.get(url + "/login", verify=ca, timeout=30)
    assert "Secure" in form.headers["Set-Cookie"]  # the session cookie, with its CSRF token
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    rsp = client.post(url + "/login", data={"username": "reader", "password": PASSWORD,
                                            "csrf_token": token.group(1)},
                      verify=ca, allow_redirects=False, timeout=30)
    assert rsp.status_code == 302, rsp.text
    cookie = rsp.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie
    assert client.get(url + "/api/me", verify=ca, timeout=30).json()["username"] == "reader"
