"""The final SR encoder on the real node's stored preliminary SR and slide: round trip and refusals."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.encode.final_sr import ReviewedCell, encode_final_report, final_series_uid
from dicom_node.settings import VL_WSM
from dicom_node.store.index import Instance
from tests.dicom_factory import dciodvfy_errors
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


def test_signing_with_unreviewed_flagged_cells_needs_and_records_the_confirmation(
        inputs, tmp_path) -> None:
    import dataclasses

    prelim, sources, cells = inputs
    # two flagged cells: one looked at, one not; one cell an erythroblast, one a platelet
    marked = [dataclasses.replace(cells[0], flagged=True, looked_at=True),
              dataclasses.replace(cells[1], flagged=True, label="erythroblast"),
              dataclasses.replace(cells[2], label="platelet"), *cells[3:]]
    with pytest.raises(ValueError, match="1 flagged cells were not reviewed"):
        encode_final_report(prelim, sources, marked, verifying_observer_name="Doe^Jane",
                            verifying_organization="Lab")
    report = encode_final_report(prelim, sources, marked, verifying_observer_name="Doe^Jane",
                                 verifying_organization="Lab", confirmed_unreviewed=True,
                                 platelets_detected=5)
    report.save_as(tmp_path / "final.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "final.dcm") == []
    back = hd.sr.srread(tmp_path / "final.dcm")
    groups = back.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in groups[0].get_measurements()}
    white = len(cells) - 2
    assert values["Number of cells flagged for review"] == 2
    assert values["Number of flagged cells not reviewed"] == 1
    assert values["Number of white cells in the differential"] == white
    statements = {q.name.meaning: q.value.meaning for q in groups[0].get_qualitative_evaluations()}
    assert statements["Signed with flagged cells not reviewed"] == "Yes"
    assert statements["Differential note"] == "Fewer than 100 white cells: interpret with caution"
    per_class = {g.tracking_identifier: {m.name.meaning: m.value for m in g.get_measurements()}
                 for g in groups[1:]}
    assert per_class["Differential: erythroblast"]["Nucleated red cells per 100 white cells"] == \
        pytest.approx(100 / white)
    assert per_class["Differential: platelet"] == {"Number of cells": 1, "Platelets seen (estimate)": 6}
    assert sum(v["Percentage of white cells"] for k, v in per_class.items()
               if "Percentage of white cells" in v) == pytest.approx(100.0)
    # every flagged cell looked at: nothing to confirm, nothing recorded
    seen = [dataclasses.replace(c, looked_at=True) for c in marked]
    plain = encode_final_report(prelim, sources, seen, verifying_observer_name="Doe^Jane",
                                verifying_organization="Lab")
    plain.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    first = hd.sr.srread(tmp_path / "plain.dcm").content.get_image_measurement_groups()[0]
    assert "Signed with flagged cells not reviewed" not in {
        q.name.meaning for q in first.get_qualitative_evaluations()}
    assert {m.name.meaning: m.value for m in first.get_measurements()}[
        "Number of flagged cells not reviewed"] == 0


def test_final_sr_names_a_changed_cell_by_its_preliminary_tracking_uid(node_case, app) -> None:
    """The viewer's final SR follows a cell from the preliminary SR: a flagged cell the reviewer
    changed carries the Tracking UID the node's preliminary SR gave it (one rule for both)."""
    import dataclasses

    from viewer.models import User
    from viewer.signoff import _slide_sources, build_final_report

    store = app.extensions["cytonode.store"]
    state = cases.case_state(store, node_case.series_instance_uid)
    with store.session() as db:
        prelim_path = store.path_of(db.get(Instance, state.summary["files"]["sr"]["sop_instance_uid"]))
    prelim_uids = {g.tracking_identifier: g.tracking_uid for g in
                   hd.sr.srread(prelim_path).content.get_planar_roi_measurement_groups()}
    cell = next(c for c in state.cells if f"Cell {c['cell_id']}" in prelim_uids)  # a flagged cell
    label = "monocyte" if cell["original_label"] != "monocyte" else "lymphocyte"
    reviewed = dataclasses.replace(state, cells=[
        {**c, "label": label, "abnormal": False, "unclassifiable": False, "changed": True}
        if c is cell else c for c in state.cells])
    user = User(username="path", person_name="Doe^Jane", organization="Lab")
    final = build_final_report(store, reviewed, user, 1, [], _slide_sources(
        store, node_case.series_instance_uid), confirmed_unreviewed=True)
    out = io.BytesIO()
    final.save_as(out, enforce_file_format=True)
    final_uids = {g.tracking_identifier: g.tracking_uid for g in hd.sr.srread(
        io.BytesIO(out.getvalue())).content.get_planar_roi_measurement_groups()}
    name = f"Cell {cell['cell_id']}"
    assert final_uids[name] == prelim_uids[name]
