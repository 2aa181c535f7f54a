"""Our objects in dicom-microscopy-viewer (Slim's and OHIF's engine), in headless Chromium.

The node analyses the sample slide (the session's ``node_case``) and sends its results to the
stand-in PACS. The page then loads the slide, the bulk annotations, the heatmap segmentation and
the SR's regions twice: from Orthanc's DICOMweb plugin (the slide and the results the node sent,
stored into Orthanc; the stand-alone page served by Orthanc's ServeFolders plugin, same origin) and
from our own ``/dicomweb`` (``/dmv/<series>``, logged in). Drawn pixels are checked where the cells
are: the outlines change the slide's pixels along every cell's outline, the heatmap changes them at
every cell's centre, and neither touches the glass between the fields. Screenshots go to the test's
temporary folder; with UPDATE_SCREENSHOTS=1 they replace docs/screenshots/dmv-*.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.app.demo import SAMPLE_SLIDE
from tests.peers import OrthancProcess
from tests.viewer.conftest import PASSWORD, wait_for_pacs
from tests.viewer.test_browser import ROOT, SCREENSHOTS, _require_browser

SCRIPT = Path(__file__).with_name("dmv.js")
ANN = "1.2.840.10008.5.1.4.1.1.91.1"
#: Glass between the sample slide's fields (base-level pixels): no cell, no heatmap.
GLASS = [(320.0, 577.0), (1154.0, 577.0), (1990.0, 577.0)]
#: The module worker of the library's bundle ends with this TypeError once set up (see viewer/dmv.py).
WORKER_QUIRK = "Cannot set properties of undefined (setting 'dicomMicroscopyViewer')"


def _cells(node_case) -> list[np.ndarray]:
    """Every cell's outline in base-level pixels, from the annotations the node sent to the PACS."""
    received = sorted(node_case.pacs.folder.glob("*.dcm"))
    ann_paths = [p for p in received if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == ANN]
    assert ann_paths, "the node sent no bulk annotations"
    ann = hd.ann.annread(ann_paths[0])
    base = next(pydicom.dcmread(p, stop_before_pixels=True) for p in SAMPLE_SLIDE.glob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                == ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    to_image = hd.spatial.ReferenceToImageTransformer.for_image(base, for_total_pixel_matrix=True)
    outlines = []
    for group in ann.get_annotation_groups():
        if group.graphic_type == hd.ann.GraphicTypeValues.POLYGON:
            outlines += [to_image(points)[:, :2] for points in group.get_graphic_data(coordinate_type="3D")]
    return outlines


def _run(node: str, chromium: str, shots: Path, name: str, page_url: str, points: list[list[float]],
         **login: str) -> dict:
    points_file = shots / f"{name}-points.json"
    points_file.write_text(json.dumps(points))
    env = dict(os.environ, PAGE_URL=page_url, CHROMIUM=chromium, SCREENSHOTS=str(shots), NAME=name,
               POINTS_FILE=str(points_file), **login)
    out = subprocess.run([node, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=False, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _changed(a: np.ndarray, b: np.ndarray, xy: list[float] | None, radius: int = 2) -> float:
    """Largest colour change between two screenshots within ``radius`` pixels of ``xy``."""
    if xy is None:
        return 0.0
    x, y = round(xy[0]), round(xy[1])
    h, w = a.shape[:2]
    if not (0 <= x < w and 0 <= y < h):
        return 0.0
    ya, yb, xa, xb = max(0, y - radius), min(h, y + radius + 1), max(0, x - radius), min(w, x + radius + 1)
    return float(np.abs(a[ya:yb, xa:xb].astype(int) - b[ya:yb, xa:xb].astype(int)).sum(axis=-1).max())


def _check_drawing(result: dict, shots: Path, name: str, outlines: list[np.ndarray]) -> dict:
    """Measure and assert what the page drew; returns the measurements."""
    assert [e for e in result["errors"] if WORKER_QUIRK not in e] == [], result["errors"]
    state = result["state"]
    assert state["error"] is None and state["errors"] == [], state
    assert state["tilesLoaded"] > 0 and state["tilesFailed"] == 0
    # every cell of the sample slide, as outlines and centres, one group per class and kind
    groups = state["annotationGroups"]
    polygons = sum(g["count"] for g in groups if g["graphicType"] == "POLYGON")
    assert polygons == len(outlines) and all(
        state["annotationsLoaded"].get(g["uid"]) == g["count"] for g in groups), state
    assert len({tuple(g["color"]) for g in groups}) == len(groups) // 2  # one colour per class
    assert [s["label"] for s in state["segments"]] == ["Counterfactual evidence", "Anomaly"]
    assert state["segmentTilesLoaded"] > 0 and state["segmentTilesFailed"] == 0
    base, ann, seg = (np.asarray(Image.open(shots / f"{name}-{s}.png").convert("RGB"))
                      for s in ("base", "annotations", "segments"))
    screen = result["screen"]
    n_points = sum(len(o) for o in outlines)
    outline_screen, centre_screen = screen[:n_points], screen[n_points:n_points + len(outlines)]
    glass_screen = screen[n_points + len(outlines):]
    per_cell, offset = [], 0
    for outline in outlines:
        hits = [_changed(ann, base, xy) > 60 for xy in outline_screen[offset:offset + len(outline)]]
        offset += len(outline)
        per_cell.append(sum(hits) / len(hits))
    heat = [_changed(seg, base, xy, radius=6) > 30 for xy in centre_screen]
    measured = {
        "outline_points_drawn_per_cell": [round(f, 3) for f in per_cell],
        "cells_with_heatmap_at_centre": sum(heat), "cells": len(outlines),
        "glass_change_annotations": max(_changed(ann, base, xy, 6) for xy in glass_screen),
        "glass_change_segments": max(_changed(seg, base, xy, 6) for xy in glass_screen),
        "slide_tiles": state["tilesLoaded"], "segment_tiles": state["segmentTilesLoaded"],
        "report_regions": len(state["rois"]),
    }
    assert min(per_cell) >= 0.8, measured  # every cell's outline is drawn where the cell is
    assert all(heat), measured  # the heatmap covers every cell
    assert measured["glass_change_annotations"] < 30 and measured["glass_change_segments"] < 30, measured
    assert state["rois"], "the SR's flagged-cell regions were not added"
    return measured


def _points(outlines: list[np.ndarray]) -> list[list[float]]:
    return ([[float(x), float(y)] for o in outlines for x, y in o]
            + [[float(x), float(y)] for x, y in (o.mean(axis=0) for o in outlines)]
            + [list(p) for p in GLASS])


def _keep(shots: Path, name: str) -> None:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots / f"{name}.png", SCREENSHOTS / f"{name}.png")


@pytest.mark.slow  # chromium
def test_dmv_draws_our_objects_from_orthanc(node_case, tmp_path: Path) -> None:
    node, chromium = _require_browser()
    from viewer.dmv import export_static

    outlines = _cells(node_case)
    for uid in [u for m, u in node_case.pacs.received if m in ("ANN", "SEG", "SR")]:
        wait_for_pacs(node_case.pacs, uid)
    static = export_static(tmp_path / "dmv", dicomweb="../dicom-web")
    orthanc = OrthancProcess(tmp_path / "orthanc", {})
    plugin = "/usr/share/orthanc/plugins/libServeFolders.so"
    if not Path(plugin).exists():
        pytest.skip("Orthanc's ServeFolders plugin is not installed")
    orthanc.config["Plugins"].append(plugin)
    orthanc.config["ServeFolders"] = {"Folders": {"/dmv": str(static)},
                                      "Extensions": {".wasm": "application/wasm"}}
    orthanc.start()
    try:
        for path in sorted(SAMPLE_SLIDE.glob("*.dcm")) + sorted(node_case.pacs.folder.glob("*.dcm")):
            orthanc.upload(path)
        shots = tmp_path / "shots"
        shots.mkdir()
        url = (f"{orthanc.url}/dmv/index.html?study={node_case.study_instance_uid}"
               f"&series={node_case.series_instance_uid}")
        result = _run(node, chromium, shots, "dmv-orthanc", url, _points(outlines))
    finally:
        orthanc.stop()
    measured = _check_drawing(result, shots, "dmv-orthanc", outlines)
    print("orthanc", json.dumps(measured))
    _keep(shots, "dmv-orthanc")


@pytest.mark.slow  # chromium
def test_dmv_draws_our_objects_from_our_dicomweb(node_case, tmp_path: Path) -> None:
    node, chromium = _require_browser()
    outlines = _cells(node_case)
    shots = tmp_path / "shots"
    shots.mkdir()
    base = f"http://127.0.0.1:{node_case.node.http_port}"
    result = _run(node, chromium, shots, "dmv-cytonode", f"{base}/dmv/{node_case.series_instance_uid}",
                  _points(outlines), LOGIN_URL=f"{base}/login", USERNAME="path", PASSWORD=PASSWORD)
    measured = _check_drawing(result, shots, "dmv-cytonode", outlines)
    print("cytonode", json.dumps(measured))
    _keep(shots, "dmv-cytonode")


def test_dmv_page_and_library_routes(node_case, client_as, app) -> None:
    anonymous = app.test_client()
    page = f"/dmv/{node_case.series_instance_uid}"
    assert anonymous.get(page).status_code == 302  # to the login page
    client, _ = client_as("tech")
    rsp = client.get(page)
    assert rsp.status_code == 200
    html = rsp.get_data(as_text=True)
    assert f'data-series="{node_case.series_instance_uid}"' in html
    assert f'data-study="{node_case.study_instance_uid}"' in html and 'data-dicomweb="/dicomweb"' in html
    csp = rsp.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "connect-src 'self';" in csp
    assert client.get("/dmv/1.2.3.4").status_code == 404
    other = client.get("/dmv/?dicomweb=http://pacs.example:8042/dicom-web&study=1.2&series=1.3")
    assert "connect-src 'self' http://pacs.example:8042;" in other.headers["Content-Security-Policy"]
    bundle = client.get("/vendor/dicom-microscopy-viewer/dicomMicroscopyViewer.bundle.min.js")
    assert bundle.status_code == 200 and len(bundle.get_data()) > 1_000_000
    worker = client.get("/vendor/dicom-microscopy-viewer/dataLoader.worker.min.js")
    assert worker.status_code == 200 and "'unsafe-eval'" in worker.headers["Content-Security-Policy"]
    assert client.get("/vendor/dicom-microscopy-viewer/dicomMicroscopyViewer.bundle.min.js.map").status_code == 404
    assert client.get("/vendor/dicomweb-client/dicomweb-client.js").status_code == 200
    assert client.get("/vendor/dicomweb-client/package.json").status_code == 404


def test_annotation_colours_are_the_slide_views() -> None:
    from dicom_node.encode.ann import CLASS_DISPLAY_COLOURS
    from viewer.slides import CLASS_COLOURS

    assert {label.value: colour for label, colour in CLASS_DISPLAY_COLOURS.items()} == CLASS_COLOURS
