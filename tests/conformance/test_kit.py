"""The conformance kit, run as integration engineers run it, against ``cytonode serve``."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conformance.conftest import SAMPLE_SLIDE
from tests.peers import CYTONODE, NodeProcess, free_port, require_tool

REPO = Path(__file__).resolve().parents[2]
# The node's own result objects, made by its offline pipeline on a small classifier budget
# (as tests/dicom_node/test_analyze.py does) and stored in the node before the kit runs.
BUDGET = ["--n-timesteps", "8", "--heatmap-timesteps", "4", "--cell-batch", "4"]


def kit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conformance", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analyze") / "out"
    run = subprocess.run([CYTONODE, "analyze", str(SAMPLE_SLIDE), "--out", str(out), *BUDGET],
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_kit_passes_against_cytonode_serve(results_dir: Path, tmp_path: Path) -> None:
    require_tool("dciodvfy")
    storescu = require_tool("storescu")
    move_port = free_port()
    node = NodeProcess(tmp_path / "node", allowed_aes="KIT,STORESCU",
                       move_destinations=f"KIT@127.0.0.1:{move_port}")
    try:
        node.start()
        subprocess.run([storescu, "-R", "-aet", "STORESCU", "-aec", "CYTONODE", "127.0.0.1",
                        str(node.port), *(str(results_dir / f"{n}.dcm") for n in ("sr", "ann", "seg"))],
                       check=True, timeout=120)
        junit = tmp_path / "kit.xml"
        run = kit("--host", "127.0.0.1", "--port", str(node.port), "--aet", "CYTONODE",
                  "--calling-aet", "KIT", "--move-port", str(move_port), "--junit", str(junit),
                  "--results-timeout", "0")
    finally:
        node.cleanup()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " 0 failed" in run.stdout
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0"
    names = [case.get("name") for case in suite.iter("testcase")]
    assert len(names) == 1 + 14 * 15 + 6 + 4 + 2 + 1
    for wanted in ("echo", "store VLWholeSlideMicroscopyImageStorage / HTJ2KLosslessRPCL",
                   "store MicroscopyBulkSimpleAnnotationsStorage / DeflatedExplicitVRLittleEndian",
                   "find IMAGE level, UID list", "get series (C-GET, role selection)",
                   "move series to KIT", "move to unknown AE refused", "unknown calling AE refused",
                   "store SOP class mismatch refused", "store truncated dataset refused",
                   "node result objects pass dciodvfy"):
        assert wanted in names


def test_kit_fails_loudly_without_a_node(tmp_path: Path) -> None:
    junit = tmp_path / "kit.xml"
    run = kit("--host", "127.0.0.1", "--port", str(free_port()), "--aet", "CYTONODE",
              "--junit", str(junit), "--timeout", "5", timeout=120)
    assert run.returncode == 1
    assert "FAIL" in run.stdout
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_kit_usage_errors_exit_2() -> None:
    run = kit("--host", "127.0.0.1", timeout=60)
    assert run.returncode == 2
    assert "--port" in run.stderr
