"""`cytonode demo --exit`, the main job, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the demo: a node, a stand-in PACS and a whole analysis

CYTONODE = str(Path(sys.executable).with_name("cytonode"))


def test_demo_sends_the_sample_slide_and_reports_it() -> None:
    out = subprocess.run([CYTONODE, "demo", "--exit"], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sending the sample slide" in out.stdout
    assert "review and sign off in the viewer: http://127.0.0.1:" in out.stdout
    assert "(user pathologist, password " in out.stdout
    assert "slide received and opened" in out.stdout
    assert " um/px, " in out.stdout
    assert "white-cell differential on " in out.stdout and "95 % Wilson interval" in out.stdout
    assert "flagged for review" in out.stdout and "nucleated red cells (erythroblasts): " in out.stdout
    # --exit ends once the results reached the stand-in PACS: all three kinds.
    for modality in ("SR", "ANN", "SEG"):
        assert f"DEMOPACS received {modality}: " in out.stdout


def test_demo_without_exit_keeps_running_and_stops_cleanly_on_sigterm() -> None:
    import re
    import signal
    import socket
    import time

    proc = subprocess.Popen([CYTONODE, "demo"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "the node keeps running" in line:
                break
        text = "".join(lines)
        assert "the node keeps running" in text, text[-3000:]
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text.split("sending the sample")[0])]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    for port in ports:  # the node, its viewer and the stand-in PACS are all gone
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
