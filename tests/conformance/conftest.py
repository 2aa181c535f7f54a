"""One running node, filled with real objects, shared by the Q/R, DICOMweb and kit tests."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from tests.dicom_factory import comprehensive_3d_sr, multiframe_sc
from tests.peers import HIGHDICOM_FILES, NodeProcess, free_port, require_tool

SAMPLE_SLIDE = Path(__file__).resolve().parents[2] / "dicom_node" / "data" / "sample_slide"
CALLERS = "STORESCU,FINDSCU,MOVESCU,GETSCU,TESTSCU,ORTHANC,KIT"
API_TOKEN = "test-token-0123456789"


def wait_for_http(node: NodeProcess, timeout: float = 60) -> None:
    """The SCP answers C-ECHO a moment before the HTTP thread listens: wait for /healthz."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"HTTP port {node.http_port} did not answer:\n{node.log()[-3000:]}")


@dataclasses.dataclass
class FilledNode:
    node: NodeProcess
    move_port: int
    #: SOP Instance UID -> the file that was sent
    sent: dict[str, Path]

    def headers(self) -> dict[str, object]:
        return {uid: dcmread(p, stop_before_pixels=True) for uid, p in self.sent.items()}


@pytest.fixture(scope="package")
def filled_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilledNode]:
    storescu = require_tool("storescu")
    root = tmp_path_factory.mktemp("qr")
    move_port = free_port()
    node = NodeProcess(root / "node", allowed_aes=CALLERS, api_token=API_TOKEN,
                       move_destinations=f"MOVESCU@127.0.0.1:{move_port},KIT@127.0.0.1:{move_port}")
    node.start()
    try:
        wait_for_http(node)
        wsm = HIGHDICOM_FILES / "sm_image.dcm"
        files = [wsm, HIGHDICOM_FILES / "sm_annotations.dcm",
                 HIGHDICOM_FILES / "seg_image_sm_dots.dcm",
                 comprehensive_3d_sr(wsm, root / "sr.dcm"),
                 multiframe_sc(root / "sc.dcm", 2), *sorted(SAMPLE_SLIDE.glob("*.dcm"))]
        run = subprocess.run([storescu, "-R", "-xy", "-aet", "STORESCU", "-aec", "CYTONODE",
                              "127.0.0.1", str(node.port), *map(str, files)],
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr
        sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
        yield FilledNode(node, move_port, sent)
    finally:
        node.cleanup()
