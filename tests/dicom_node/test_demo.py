"""`cytonode demo --exit`, the main job, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CYTONODE = str(Path(sys.executable).with_name("cytonode"))


def test_demo_sends_the_sample_slide_and_reports_it() -> None:
    out = subprocess.run([CYTONODE, "demo", "--exit"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sending the sample slide" in out.stdout
    assert "review and sign off in the viewer: http://127.0.0.1:" in out.stdout
    assert "(user pathologist, password " in out.stdout
    assert "slide received and opened" in out.stdout
    assert " um/px, " in out.stdout
    assert "differential (percentage with 95% Wilson interval)" in out.stdout
    # --exit ends once the results reached the stand-in PACS: all three kinds.
    for modality in ("SR", "ANN", "SEG"):
        assert f"DEMOPACS received {modality}: " in out.stdout
