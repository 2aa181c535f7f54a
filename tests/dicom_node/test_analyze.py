"""``cytonode analyze``: the whole offline pipeline on the real sample slide.

One real run of the command (a subprocess, as an operator runs it) is shared by the
tests of this module. The classifier budget is kept small (8 timesteps per class,
4 per heatmap) so the run takes well under a minute on a small CPU; the calibrated
budget is the command's default.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from analysis.classes import CLASS_NAMES
from analysis.results import wilson_interval
from dicom_node.encode.differential import class_label

REPO = Path(__file__).resolve().parents[2]
SLIDE = REPO / "dicom_node" / "data" / "sample_slide"
CYTONODE = Path(sys.executable).parent / "cytonode"
BUDGET = ["--n-timesteps", "8", "--heatmap-timesteps", "4", "--cell-batch", "4"]

# The one dciodvfy false positive on our segmentations, explained (with the premise checked
# against dciodvfy's verbose output) in tests/dicom_node/test_encode.py: PS3.3 C.7.6.1 makes
# Patient Orientation Type 2C, not required when Image Orientation (Slide) is required.
SEG_FALSE_POSITIVE = ("Error - Missing attribute Type 2C Conditional Element=<PatientOrientation> "
                      "Module=<GeneralImage>")
SEG_PREMISE = ("Valid Element - Type 1C Conditional Element=<ImageOrientationSlide> "
               "Module=<SegmentationImage>")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CYTONODE), *args], check=False, capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("analyze") / "out"
    run = _run("analyze", str(SLIDE), "--out", str(out), *BUDGET)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, summary


@pytest.fixture(scope="module")
def base() -> pydicom.Dataset:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(SLIDE.glob("*.dcm"))]
    return max(headers, key=lambda ds: int(ds.TotalPixelMatrixColumns))


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_writes_the_three_objects_and_the_summary(analyzed: tuple[Path, dict[str, Any]]) -> None:
    out, summary = analyzed
    for name in ("sr.dcm", "ann.dcm", "seg.dcm", "summary.json"):
        assert (out / name).is_file(), name
    assert set(summary["timings_s"]) >= {"read", "detect", "classify", "encode", "total"}
    assert all(v >= 0 for v in summary["timings_s"].values())
    provenance = summary["provenance"]
    assert provenance["name"] == "cytodiffusion" and len(provenance["weights_sha256"]) == 64
    assert provenance["parameters"]["n_timesteps"] == 8 and provenance["parameters"]["seed"] == 0


def test_summary_is_a_versioned_slide_summary(analyzed: tuple[Path, dict[str, Any]]) -> None:
    from dicom_node.jobs.result import SlideSummary, read_summary

    out, summary = analyzed
    assert summary["schema"] == "cytonode.slide-summary/1"
    assert read_summary(out).as_dict() == summary == SlideSummary.from_dict(summary).as_dict()


def test_classify_and_encode_read_the_open_slide_once(analyzed: tuple[Path, dict[str, Any]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, as the worker runs it: one open of the slide serves the classifier, the
    encoders and the gallery, and gives what ``cytonode analyze`` gave from the paths."""
    from wsidicom import WsiDicom

    from analysis.pipeline import PipelineConfig, classify_slide
    from analysis.tiles import Slide
    from dicom_node.jobs.encoding import encode_results
    from tests.dicom_node.test_job_result import Reads

    files = sorted(SLIDE.glob("*.dcm"))
    reads = Reads(files)
    monkeypatch.setattr(pydicom, "dcmread", reads.count_dcmread(pydicom.dcmread))
    monkeypatch.setattr(WsiDicom, "open", staticmethod(reads.count_open(WsiDicom.open)))
    config = PipelineConfig(n_timesteps=8, heatmap_timesteps=4, cell_batch=4)
    with Slide.open(files) as slide:
        result = classify_slide(slide, config)
        objects = encode_results(result, slide)
    assert reads.wsidicom_opens == 1
    assert reads.dcmreads == {name: 1 for name in reads.names}
    _, summary = analyzed
    assert [c.label.value for c in result.cells] == [c["label"] for c in summary["cells"]]
    assert set(objects) == set(summary["files"])


def test_summary_differential_adds_up(analyzed: tuple[Path, dict[str, Any]]) -> None:
    _, summary = analyzed
    n = summary["cell_count"]
    assert n == len(summary["cells"]) > 0
    rows = summary["differential"]
    assert [r["label"] for r in rows] == list(CLASS_NAMES)
    assert sum(r["count"] for r in rows) == n
    # percentages and intervals over white cells only; erythroblasts and platelets apart
    white = [r for r in rows if r["white_cell"]]
    assert [r["label"] for r in white] == list(CLASS_NAMES[:6])
    n_white = sum(r["count"] for r in white)
    assert summary["report"]["white_cells"] == n_white
    if n_white:
        assert sum(r["percentage"] for r in white) == pytest.approx(100.0, abs=0.01)
    for r in white:
        if n_white:
            low, high = wilson_interval(r["count"], n_white)
            assert r["ci95"] == pytest.approx([100 * low, 100 * high], abs=1e-3)
    for r in rows:
        assert r["count"] == sum(1 for c in summary["cells"] if c["label"] == r["label"])
    assert all(r["percentage"] is None for r in rows if not r["white_cell"])
    if n_white < 100:
        assert summary["report"]["note"].startswith(f"differential on {n_white} white cell")
    flagged = [c["cell_id"] for c in summary["cells"] if c["review"]]
    assert [c["cell_id"] for c in summary["flagged"]] == flagged
    assert summary["report"]["flagged"] == len(flagged)
    assert all(c["review"] for c in summary["cells"] if c["abnormal"])  # abnormal cells go to review
    for c in summary["cells"]:
        assert (c["review_reason"] is not None) == c["review"]
        assert (c["abnormal_reason"] is not None) == c["abnormal"]


def test_cells_match_detect_and_annotations(analyzed: tuple[Path, dict[str, Any]]) -> None:
    out, summary = analyzed
    detect = _run("detect", str(SLIDE), "--json")
    assert detect.returncode == 0, detect.stderr[-2000:]
    detected = json.loads(detect.stdout)["cells"]
    ann = hd.ann.annread(out / "ann.dcm")
    outlines = [g for g in ann.get_annotation_groups()
                if g.graphic_type == hd.ann.GraphicTypeValues.POLYGON]
    annotated = sum(int(g.number_of_annotations) for g in outlines)
    assert annotated == summary["cell_count"] == len(detected)
    for cell, found in zip(summary["cells"], detected):
        assert cell["bbox"] == found["bbox"]
        assert (cell["x"], cell["y"]) == pytest.approx((found["x"], found["y"]), abs=0.11)
    labels = sorted(g.label.rsplit(" ", 1)[0] for g in outlines)  # "<class in words> outlines"
    assert labels == sorted({class_label(c["label"]) for c in summary["cells"]})


def test_report_references_the_slide(analyzed: tuple[Path, dict[str, Any]],
                                     base: pydicom.Dataset) -> None:
    out, summary = analyzed
    sr = hd.sr.srread(out / "sr.dcm")
    assert sr.StudyInstanceUID == base.StudyInstanceUID == summary["slide"]["study_instance_uid"]
    assert sr.SeriesInstanceUID != base.SeriesInstanceUID
    assert (sr.PreliminaryFlag, sr.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                if study.StudyInstanceUID == base.StudyInstanceUID
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert base.SOPInstanceUID in evidence
    total = sr.content.get_image_measurement_groups()[0].get_measurements()
    values = {m.name.meaning: m.value for m in total}
    assert values["Number of cells"] == summary["cell_count"]
    review = sum(c["review"] for c in summary["cells"])
    assert values["Number of cells flagged for review"] == review
    regions = sr.content.get_planar_roi_measurement_groups()
    assert len(regions) == len(summary["flagged"])


def test_segmentation_holds_both_heatmaps(analyzed: tuple[Path, dict[str, Any]],
                                          base: pydicom.Dataset) -> None:
    out, summary = analyzed
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.StudyInstanceUID == base.StudyInstanceUID
    assert seg.FrameOfReferenceUID == base.FrameOfReferenceUID
    assert [s.segment_label for s in seg.SegmentSequence] == ["Counterfactual evidence", "Anomaly"]
    shape = summary["heatmaps"][0]["shape"]
    assert [int(seg.TotalPixelMatrixRows), int(seg.TotalPixelMatrixColumns)] == shape
    matrix = seg.get_total_pixel_matrix(segment_numbers=[1, 2])
    assert 0.0 <= float(matrix.min()) and float(matrix.max()) <= 1.0
    assert float(matrix[..., 0].max()) == pytest.approx(1.0)  # evidence: 1 is the slide's strongest


def test_dciodvfy_reports_no_errors(analyzed: tuple[Path, dict[str, Any]]) -> None:
    out, _ = analyzed
    assert _dciodvfy_errors(out / "sr.dcm") == []
    assert _dciodvfy_errors(out / "ann.dcm") == []
    assert [e for e in _dciodvfy_errors(out / "seg.dcm") if e != SEG_FALSE_POSITIVE] == []
    verbose = subprocess.run(["dciodvfy", "-verbose", str(out / "seg.dcm")], capture_output=True,
                             text=True, check=False)
    assert SEG_PREMISE in verbose.stdout + verbose.stderr


@pytest.mark.parametrize("what", ["text file", "empty folder", "not a slide", "missing"])
def test_bad_input_exits_2(tmp_path: Path, analyzed: tuple[Path, dict[str, Any]],
                           what: str) -> None:
    if what == "text file":
        target = tmp_path / "notes.txt"
        target.write_text("not a slide\n")
    elif what == "empty folder":
        target = tmp_path / "empty"
        target.mkdir()
    elif what == "not a slide":  # a DICOM file, but an SR, not a VL Whole Slide Microscopy image
        target = analyzed[0] / "sr.dcm"
    else:
        target = tmp_path / "nowhere"
    run = _run("analyze", str(target), "--out", str(tmp_path / "out"), *BUDGET, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    reason = [line for line in run.stderr.splitlines() if line.startswith("cytonode analyze:")]
    assert len(reason) == 1, run.stderr[-2000:]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_slide_without_white_cells_gets_only_a_report(tmp_path: Path) -> None:
    # A real slide (built by `cytonode make-slide`) of one blank, glass-coloured field.
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    field = np.full((480, 640, 3), (235, 215, 215), np.uint8) + rng.integers(0, 8, (480, 640, 3),
                                                                              dtype=np.uint8)
    Image.fromarray(field).save(tmp_path / "blank.png")
    made = _run("make-slide", str(tmp_path / "blank.png"), "--out", str(tmp_path / "slide"))
    assert made.returncode == 0, made.stderr[-2000:]
    run = _run("analyze", str(tmp_path / "slide"), "--out", str(tmp_path / "out"), *BUDGET)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pdf.dcm", "sr.dcm", "summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cell_count"] == 0 and summary["flagged"] == [] and summary["heatmaps"] == []
    assert all(r["count"] == 0 and r["percentage"] is None for r in summary["differential"])
    assert _dciodvfy_errors(tmp_path / "out" / "sr.dcm") == []
    sr = hd.sr.srread(tmp_path / "out" / "sr.dcm")
    total = sr.content.get_image_measurement_groups()[0].get_measurements()
    assert total[0].value == 0


def test_each_cell_keeps_what_each_model_called(analyzed: tuple[Path, dict[str, Any]]) -> None:
    """summary.json keeps the diffusion classifier's and the second model's own calls of every
    cell; "models disagree" is flagged exactly where they differ, and its words name both."""
    from analysis.classes import CLASS_NAMES
    from dicom_node.encode.differential import cell_reason_labels, class_label

    _, summary = analyzed
    assert summary["cells"]
    for cell in summary["cells"]:
        assert cell["diffusion_label"] in CLASS_NAMES and cell["reference_label"] in CLASS_NAMES
        disagree = cell["diffusion_label"] != cell["reference_label"]
        assert ("models-disagree" in cell["review_reasons"]) == disagree
        if disagree:
            words = f"models disagree (diffusion model: {class_label(cell['diffusion_label'])}, " \
                    f"second model: {class_label(cell['reference_label'])})"
            assert words in cell_reason_labels(cell)
