"""The viewer in headless Chromium (playwright-core from npm drives Debian's chromium).

A pathologist logs in, opens the case from the worklist, the slide's tiles load and the cell
outlines draw, a click on a flagged cell opens it in the review, a key reclassifies it, the
pathologist signs, and the verified final SR arrives in the stand-in PACS. Screenshots are taken
into the test's temporary folder; with UPDATE_SCREENSHOTS=1 they replace docs/screenshots/ (so that a
test run leaves the checkout as it was).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest

from tests.viewer.conftest import PASSWORD, chromium_path, wait_for_pacs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("browser.js")
SCREENSHOTS = ROOT / "docs" / "screenshots"


def _require_browser() -> tuple[str, str]:
    node = shutil.which("node")
    chromium = chromium_path()
    reason = None
    if node is None:
        reason = "node is not installed (make test installs it)"
    elif chromium is None:
        reason = "chromium is not installed (make test installs the Debian package as root)"
    elif not (ROOT / "node_modules" / "playwright-core").is_dir():
        reason = "node_modules/playwright-core is missing: run `npm ci` (make test does)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(node), str(chromium)


def test_pathologist_reviews_and_signs_in_the_browser(node_case, tmp_path: Path) -> None:
    node, chromium = _require_browser()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = dict(os.environ, BASE_URL=f"http://127.0.0.1:{node_case.node.http_port}",
               SERIES=node_case.series_instance_uid, USERNAME="path", PASSWORD=PASSWORD,
               CHROMIUM=chromium, SCREENSHOTS=str(shots))
    out = subprocess.run([node, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-4000:] + "\nnode log:\n" + node_case.node.log()[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    # tiles: loaded, all stored frames passed through, none failed; outlines of every cell drawn
    assert result["slide"]["tilesLoaded"] > 0 and result["slide"]["tilesFailed"] == 0
    assert result["tiles"]["stored-frame"] > 0 and result["tiles"]["failed"] == 0
    cell_count = node_case.job["result"]["cell_count"]
    assert result["slide"]["overlays"] == cell_count == result["overlays_visible"]
    assert result["heatmap"] in ("counterfactual-evidence", "anomaly")
    # the clicked cell opened selected, and the key reclassified it
    assert result["selected"] is True
    assert result["reclassified"]["changes"] >= 1 and result["differential_count"] >= 1
    # signed: the final SR is in the stand-in PACS
    signed = [v for v in result["versions"] if v["signed_at"]]
    assert signed, result["versions"]
    uid = signed[-1]["sr_sop_instance_uid"]
    report = hd.sr.srread(wait_for_pacs(node_case.pacs, uid))
    assert report.VerificationFlag == "VERIFIED" and report.PreliminaryFlag == "FINAL"
    assert f"Cell {result['cell_id']}" in str(report)
    for name in ("worklist", "slide", "review", "signoff"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copyfile(png, SCREENSHOTS / png.name)
