"""WADO-RS frames: a request is bounded by the instance's own frames (issue 22, defect 8)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pynetdicom import AE

from tests.peers import NodeProcess

SAMPLE_SLIDE = Path(__file__).resolve().parents[2] / "dicom_node" / "data" / "sample_slide"
TOKEN = "frames-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def slide_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, str, int]]:
    """A node holding the sample slide's base level (JPEG frames); the frames URL, the frame count."""
    node = NodeProcess(tmp_path_factory.mktemp("frames") / "node", api_token=TOKEN)
    node.start()
    try:
        path = sorted(SAMPLE_SLIDE.glob("*.dcm"))[1]
        ds = dcmread(path)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CYTONODE")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        url = (f"http://127.0.0.1:{node.http_port}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
               f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/")
        yield node, url, int(ds.NumberOfFrames)
    finally:
        node.cleanup()


def _get(url: str, **headers: str) -> requests.Response:
    for _ in range(100):  # the HTTP thread listens a moment after the SCP answers
        try:
            return requests.get(url, headers={**AUTH, **headers}, timeout=120)
        except requests.ConnectionError:
            import time
            time.sleep(0.2)
    raise AssertionError("HTTP port did not answer")


def test_repeated_frame_numbers_are_refused_with_the_limit(slide_node) -> None:
    node, url, frames = slide_node
    assert frames < 300
    before = node.rss()
    rsp = _get(url + ",".join(["1"] * 600))
    assert rsp.status_code == 400, rsp.status_code
    assert f"at most {frames} frame" in rsp.text, rsp.text  # names the limit
    rsp = _get(url + ",".join(["1", "2"] * 300), Accept='multipart/related; '
               'type="application/octet-stream"; transfer-syntax=*')
    assert rsp.status_code == 400
    rsp = _get(url + "1,2,1")
    assert rsp.status_code == 400 and "once" in rsp.text, rsp.text
    assert node.rss() - before < 32 << 20


def test_every_frame_once_is_served(slide_node) -> None:
    _node, url, frames = slide_node
    rsp = _get(url + ",".join(str(n) for n in range(frames, 0, -1)))
    assert rsp.status_code == 200
    assert rsp.content.count(b"Content-Type: application/octet-stream") == frames
    stored = _get(url + "3,1", Accept='multipart/related; type="application/octet-stream"; '
                  'transfer-syntax=*')
    assert stored.status_code == 200
    assert stored.content.count(b"\xff\xd8") >= 2  # two JPEG frames as stored
