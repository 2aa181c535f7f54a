"""The viewer in headless Chromium (playwright-core from npm drives Debian's chromium).

A pathologist logs in, opens the case from the worklist, the slide's tiles load and the cell
outlines draw, a click on a cell opens it in the review, a key reclassifies it; the flagged cell
nobody looked at stops the signature (the form and the server refuse it) until the pathologist
confirms it, and the verified final SR that arrives in the stand-in PACS says so, as the audit log
does. Every case page names the patient, the accession and the slide. Screenshots are taken
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
import pydicom
import pytest
from sqlalchemy import select

from analysis.results import FLAG_REASON_LABELS, FlagReasonValues
from dicom_node.app.demo import SAMPLE_SLIDE
from dicom_node.encode.differential import cell_reason_labels, class_label
from tests.viewer.conftest import PASSWORD, chromium_path, wait_for_pacs
from viewer import cases
from viewer.models import AuditEvent

pytestmark = pytest.mark.slow  # drives chromium through a whole review

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


def test_pathologist_reviews_and_signs_in_the_browser(node_case, app, tmp_path: Path) -> None:
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
    # every case page names the patient, the accession and the slide, and the same flag count
    slide = pydicom.dcmread(next(SAMPLE_SLIDE.glob("*.dcm")), stop_before_pixels=True)
    summary = cases.load_summary(node_case.settings, node_case.series_instance_uid)
    flagged = [c for c in summary["cells"] if c["review"]]
    assert flagged, "the sample slide has a cell flagged for review"
    expected = {"patient-name": " ".join(str(slide.PatientName).split("^")),
                "patient-id": slide.PatientID, "accession-number": slide.AccessionNumber,
                "slide-id": f"{slide.ContainerIdentifier} (specimen "
                            f"{slide.SpecimenDescriptionSequence[0].SpecimenIdentifier})",
                "flag-count": node_case.job["result"]["report"]["text"]["flags"]}
    assert expected["flag-count"].startswith(f"{len(flagged)} flagged for review")
    for page in ("slide", "review", "signoff"):
        assert result["identity"][page] == expected, page
    # the differential on 7 white cells says it is to be read with caution, on every page
    note = f"differential on {summary['report']['white_cells']} white cells (fewer than 100): interpret with caution"
    assert result["slide_note"] == result["signoff_note"] == note
    # cards carry their number, class buttons the class names, flagged cards their reasons in words
    assert result["card"]["number"] == f"Cell {result['cell_id']}"
    assert result["card"]["buttons"] == [class_label(c) for c in (
        "neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", "ig", "erythroblast", "platelet")]
    assert "immature granulocyte" in result["card"]["buttons"] and "ig" not in result["card"]["buttons"]
    first = next(c for c in flagged if c["cell_id"] == result["card"]["flagged_id"])
    assert result["card"]["flagged_number"] == f"Cell {first['cell_id']}"
    assert result["card"]["flagged_reasons"] == ["review: " + r for r in cell_reason_labels(first)] + (
        ["marked abnormal"] if first["abnormal"] else [])
    # each reason in words, and behind "models disagree" what each model called
    assert [r.split(" (")[0] for r in cell_reason_labels(first)] == [
        FLAG_REASON_LABELS[FlagReasonValues(r)] for r in first["review_reasons"]]
    if "models-disagree" in first["review_reasons"]:
        assert any(f"diffusion model: {class_label(first['diffusion_label'])}, second model: "
                   f"{class_label(first['reference_label'])}" in r
                   for r in result["card"]["flagged_reasons"])
    assert result["card"]["flagged_unseen"] is True
    # the clicked cell opened selected, and the key reclassified it
    assert result["selected"] is True
    assert result["reclassified"]["changes"] >= 1 and result["differential_count"] >= 1
    n = result["reclassified"]["changes"]
    assert result["reclassified"]["changes_text"] == f"{n} cell{'' if n == 1 else 's'} changed."
    # the flagged cells nobody looked at: no signature without the confirmation
    assert len(result["unreviewed"]) == len(flagged)
    assert result["unreviewed"][0].startswith(f"Cell {flagged[0]['cell_id']}: ")
    assert result["blocked_by_form"] is True
    assert result["refused"]["status"] == 409 and result["refused"]["signed"] is False
    assert "not reviewed" in result["refused"]["error"]
    # signed with it: the final SR is in the stand-in PACS and records the confirmation
    signed = [v for v in result["versions"] if v["signed_at"]]
    assert len(signed) == 1, result["versions"]
    uid = signed[-1]["sr_sop_instance_uid"]
    report = hd.sr.srread(wait_for_pacs(node_case.pacs, uid))
    assert report.VerificationFlag == "VERIFIED" and report.PreliminaryFlag == "FINAL"
    assert f"Cell {result['cell_id']}" in str(report)
    group = report.content.get_image_measurement_groups()[0]
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Number of flagged cells not reviewed"] == len(flagged)
    assert values["Number of cells flagged for review"] == len(flagged)
    statements = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
    assert statements["Signed with flagged cells not reviewed"] == "Yes"
    # and the audit log: the refusal and the confirmed signature
    with app.extensions["cytonode.store"].session() as db:
        events = db.scalars(select(AuditEvent).where(
            AuditEvent.target == node_case.series_instance_uid)).all()
    actions = {e.action: e.detail for e in events if e.username == "path"}
    assert actions["sign_refused"] == f"{len(flagged)} flagged cells not reviewed, not confirmed"
    assert actions["sign_unreviewed"].startswith(
        f"version 1: signed with {len(flagged)} flagged cells not reviewed (confirmed by the signer)")
    for name in ("worklist", "slide", "review", "signoff"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copyfile(png, SCREENSHOTS / png.name)
