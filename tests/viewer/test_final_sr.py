"""The final SR encoder on the real node's stored preliminary SR and slide: round trip and refusals."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.encode.final_sr import ReviewedCell, encode_final_report, final_series_uid
from dicom_node.index import Instance
from dicom_node.settings import VL_WSM
from viewer import cases


@pytest.fixture(scope="module")
def inputs(node_case, app):
    store = app.extensions["cytonode.store"]
    summary = cases.load_summary(node_case.settings, node_case.series_instance_uid)
    with store.session() as db:
        prelim = store.path_of(db.get(Instance, summary["files"]["sr"]["sop_instance_uid"]))
        sources = [store.path_of(i) for i in db.scalars(select(Instance).where(
            Instance.series_instance_uid == node_case.series_instance_uid,
            Instance.sop_class_uid == VL_WSM)).all()]
    cells = [ReviewedCell(c["cell_id"], tuple(c["bbox"]), c["label"], c["label"], c["abnormal"],
                          c["abnormal"]) for c in summary["cells"]]
    return (pydicom.dcmread(prelim), [pydicom.dcmread(p, stop_before_pixels=True) for p in sources],
            cells)


def test_round_trip_names_the_changes(inputs) -> None:
    prelim, sources, cells = inputs
    changed = [ReviewedCell(cells[0].cell_id, cells[0].bbox, cells[0].original_label, "ig",
                            unclassifiable=False), *cells[1:]]
    report = encode_final_report(prelim, sources, changed, verifying_observer_name="Doe^Jane",
                                 verifying_organization="Lab")
    out = io.BytesIO()
    report.save_as(out, enforce_file_format=True)
    back = hd.sr.srread(io.BytesIO(out.getvalue()))
    assert back.SeriesInstanceUID == final_series_uid(prelim)
    assert (back.VerificationFlag, back.PreliminaryFlag, back.CompletionFlag) == (
        "VERIFIED", "FINAL", "COMPLETE")
    text = str(back)
    assert f"Cell {cells[0].cell_id}" in text and "Immature granulocyte" in text
    assert "Number of cells changed by the reviewer" in text


def test_refuses_bad_input(inputs) -> None:
    prelim, sources, cells = inputs
    with pytest.raises(ValueError):
        encode_final_report(prelim, sources, cells, verifying_observer_name=" ",
                            verifying_organization="Lab")
    with pytest.raises(ValueError):
        encode_final_report(prelim, sources, cells, verifying_observer_name="Doe^Jane",
                            verifying_organization="Lab", version=0)
    final = encode_final_report(prelim, sources, cells, verifying_observer_name="Doe^Jane",
                                verifying_organization="Lab")
    with pytest.raises(ValueError):  # a final report is no preliminary one
        encode_final_report(final, sources, cells, verifying_observer_name="Doe^Jane",
                            verifying_organization="Lab")
    with pytest.raises(ValueError):
        ReviewedCell(1, (10, 10, 5, 20), "monocyte", "monocyte")
    with pytest.raises(ValueError):
        ReviewedCell(1, (0, 0, 5, 5), "monocyte", "blast")
