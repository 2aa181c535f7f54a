"""Query/Retrieve SCP against real peers: DCMTK findscu, getscu, movescu and pynetdicom SCUs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    MicroscopyBulkSimpleAnnotationsStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.status import QueryRetrieveStatusValues as Q
from tests.conformance.conftest import SAMPLE_SLIDE, FilledNode
from tests.dicom_factory import dataset_digest
from tests.peers import HIGHDICOM_FILES, require_tool

WSM = HIGHDICOM_FILES / "sm_image.dcm"
ANN = HIGHDICOM_FILES / "sm_annotations.dcm"
HD_STUDY = str(dcmread(WSM, stop_before_pixels=True).StudyInstanceUID)
SLIDE_STUDY = str(dcmread(next(SAMPLE_SLIDE.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def findscu(node: FilledNode, out: Path, *keys: str, model: str = "-S") -> list[Dataset]:
    """Run DCMTK findscu, writing each response to a file; return the responses."""
    out.mkdir(parents=True, exist_ok=True)
    args = [require_tool("findscu"), model, "-aet", "FINDSCU", "-aec", "CYTONODE", "-X", "-od",
            str(out), "127.0.0.1", str(node.node.port)]
    for key in keys:
        args += ["-k", key]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_study_root_study_level(filled_node: FilledNode, tmp_path: Path) -> None:
    rsps = findscu(filled_node, tmp_path / "all", "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                   "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
                   "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries")
    by_uid = {str(r.StudyInstanceUID): r for r in rsps}
    headers = filled_node.headers()
    expected = {str(h.StudyInstanceUID) for h in headers.values()}
    assert set(by_uid) >= expected  # other tests of the package may add studies (STOW-RS)
    hd = by_uid[HD_STUDY]
    assert (hd.PatientID, str(hd.PatientName), hd.StudyDate) == ("AA01", "Test^Patient", "20190604")
    in_study = [h for h in headers.values() if h.StudyInstanceUID == HD_STUDY]
    assert int(hd.NumberOfStudyRelatedInstances) == len(in_study)
    assert int(hd.NumberOfStudyRelatedSeries) == len({h.SeriesInstanceUID for h in in_study})
    assert set(hd.ModalitiesInStudy) == {h.Modality for h in in_study}
    assert all(r.QueryRetrieveLevel == "STUDY" for r in rsps)

    # date range, open-ended range, wildcard name, case-insensitive name, modality list
    dated = findscu(filled_node, tmp_path / "range", "QueryRetrieveLevel=STUDY",
                    "StudyInstanceUID", "StudyDate=20190101-20191231")
    assert [str(r.StudyInstanceUID) for r in dated] == [HD_STUDY]
    after = findscu(filled_node, tmp_path / "after", "QueryRetrieveLevel=STUDY",
                    "StudyInstanceUID", "StudyDate=20200101-")
    assert HD_STUDY not in {str(r.StudyInstanceUID) for r in after} and after
    wild = findscu(filled_node, tmp_path / "wild", "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                   "PatientName=bccd*")
    assert [str(r.StudyInstanceUID) for r in wild] == [SLIDE_STUDY]
    qmark = findscu(filled_node, tmp_path / "qmark", "QueryRetrieveLevel=STUDY",
                    "StudyInstanceUID", "PatientID=AA0?")
    assert [str(r.StudyInstanceUID) for r in qmark] == [HD_STUDY]
    # LIKE metacharacters in the value are literal, not wildcards
    none = findscu(filled_node, tmp_path / "pct", "QueryRetrieveLevel=STUDY",
                   "StudyInstanceUID", "PatientID=%")
    assert none == []
    mods = findscu(filled_node, tmp_path / "mods", "QueryRetrieveLevel=STUDY",
                   "StudyInstanceUID", "ModalitiesInStudy=ANN\\OT")
    mod_uids = {str(r.StudyInstanceUID) for r in mods}
    assert HD_STUDY in mod_uids and SLIDE_STUDY not in mod_uids


def test_findscu_series_and_image_levels(filled_node: FilledNode, tmp_path: Path) -> None:
    headers = filled_node.headers()
    series = findscu(filled_node, tmp_path / "series", "QueryRetrieveLevel=SERIES",
                     f"StudyInstanceUID={HD_STUDY}", "SeriesInstanceUID", "Modality",
                     "NumberOfSeriesRelatedInstances")
    assert {str(r.SeriesInstanceUID) for r in series} == {
        str(h.SeriesInstanceUID) for h in headers.values() if h.StudyInstanceUID == HD_STUDY}
    sm = findscu(filled_node, tmp_path / "sm", "QueryRetrieveLevel=SERIES", "Modality=SM",
                 "SeriesInstanceUID", "StudyInstanceUID")
    assert {r.StudyInstanceUID for r in sm} == {HD_STUDY, SLIDE_STUDY}
    slide_uids = sorted(str(h.SOPInstanceUID) for h in headers.values()
                        if h.StudyInstanceUID == SLIDE_STUDY)
    images = findscu(filled_node, tmp_path / "images", "QueryRetrieveLevel=IMAGE",
                     f"StudyInstanceUID={SLIDE_STUDY}", "SeriesInstanceUID",
                     "SOPInstanceUID=" + "\\".join(slide_uids[:2]), "SOPClassUID",
                     "InstanceNumber", "Rows", "Columns", "ImageType")
    assert sorted(str(r.SOPInstanceUID) for r in images) == slide_uids[:2]
    for r in images:  # values from the stored object, indexed or not
        h = headers[str(r.SOPInstanceUID)]
        assert (r.SOPClassUID, r.Rows, r.Columns, list(r.ImageType)) == (
            h.SOPClassUID, h.Rows, h.Columns, list(h.ImageType))
        assert int(r.InstanceNumber) == int(h.InstanceNumber)


def test_findscu_patient_root(filled_node: FilledNode, tmp_path: Path) -> None:
    patients = findscu(filled_node, tmp_path / "p", "QueryRetrieveLevel=PATIENT", "PatientID",
                       "PatientName", "NumberOfPatientRelatedStudies", model="-P")
    ids = {h.PatientID for h in filled_node.headers().values()}
    assert {r.PatientID for r in patients} >= ids
    studies = findscu(filled_node, tmp_path / "s", "QueryRetrieveLevel=STUDY", "PatientID=AA01",
                      "StudyInstanceUID", model="-P")
    assert {str(r.StudyInstanceUID) for r in studies} == {HD_STUDY}


def _assoc(node: FilledNode, *contexts: str, roles: list | None = None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="TESTSCU")
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", node.node.port, ae_title="CYTONODE",
                         ext_neg=roles or [])
    assert assoc.is_established
    return assoc


def _statuses(responses) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(status.Status) for status, _ in responses if status]


@pytest.mark.parametrize(("keys", "expected"), [
    ({"QueryRetrieveLevel": "BOGUS"}, Q.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
    ({"PatientID": "AA01"}, Q.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "AA01"},
     Q.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # not in the Study Root model
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2019-2020-2021"}, Q.UNABLE_TO_PROCESS),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, Q.UNABLE_TO_PROCESS),
])
def test_find_bad_identifier_statuses(filled_node: FilledNode, keys: dict, expected: int) -> None:
    assoc = _assoc(filled_node, StudyRootQueryRetrieveInformationModelFind)
    try:
        ds = Dataset()
        for k, v in keys.items():
            setattr(ds, k, v)
        statuses = _statuses(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert statuses == [expected]


def test_patient_root_patient_level_with_pynetdicom(filled_node: FilledNode) -> None:
    assoc = _assoc(filled_node, PatientRootQueryRetrieveInformationModelFind)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.PatientID, ds.PatientName = "PATIENT", "", "test^pat*"
        rsps = list(assoc.send_c_find(ds, PatientRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert [int(s.Status) for s, _ in rsps] == [Q.PENDING, Q.SUCCESS]
    assert rsps[0][1].PatientID == "AA01"


def test_getscu_series_files_equal_stored(filled_node: FilledNode, tmp_path: Path) -> None:
    getscu = require_tool("getscu")
    headers = filled_node.headers()
    sm = next(h for h in headers.values() if h.StudyInstanceUID == HD_STUDY and h.Modality == "SM")
    out = tmp_path / "get"
    out.mkdir()
    run = subprocess.run([getscu, "-S", "-aet", "GETSCU", "-aec", "CYTONODE", "-od", str(out),
                          "127.0.0.1", str(filled_node.node.port), "-k",
                          "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={HD_STUDY}", "-k",
                          f"SeriesInstanceUID={sm.SeriesInstanceUID}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    got = {dataset_digest(p)[0]: p for p in out.iterdir()}
    wanted = {uid for uid, h in headers.items() if h.SeriesInstanceUID == sm.SeriesInstanceUID}
    assert set(got) == wanted
    for uid in wanted:
        assert dataset_digest(got[uid])[::2] == dataset_digest(filled_node.sent[uid])[::2]


def test_pynetdicom_get_annotations_with_role_selection(filled_node: FilledNode) -> None:
    """DCMTK 3.6.7's getscu does not offer the bulk annotation class; pynetdicom does."""
    received: list[Dataset] = []

    def handle_store(event):  # type: ignore[no-untyped-def]
        received.append(event.dataset)
        return 0x0000

    from pynetdicom import evt

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MicroscopyBulkSimpleAnnotationsStorage)
    assoc = ae.associate("127.0.0.1", filled_node.node.port, ae_title="CYTONODE",
                         ext_neg=[build_role(MicroscopyBulkSimpleAnnotationsStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert assoc.is_established
    ann = dcmread(ANN, stop_before_pixels=True)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID = "IMAGE", HD_STUDY
        ds.SeriesInstanceUID, ds.SOPInstanceUID = ann.SeriesInstanceUID, ann.SOPInstanceUID
        statuses = _statuses(assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet))
        bad = Dataset()
        bad.QueryRetrieveLevel, bad.StudyInstanceUID = "STUDY", ""
        bad_statuses = _statuses(assoc.send_c_get(bad, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert statuses[-1] == Q.SUCCESS
    assert [str(d.SOPInstanceUID) for d in received] == [str(ann.SOPInstanceUID)]
    assert received[0].AnnotationGroupSequence == dcmread(ANN).AnnotationGroupSequence
    assert bad_statuses[-1] == Q.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_movescu_study_to_known_ae(filled_node: FilledNode, tmp_path: Path) -> None:
    movescu = require_tool("movescu")
    out = tmp_path / "move"
    out.mkdir()
    run = subprocess.run([movescu, "-S", "-aet", "MOVESCU", "-aem", "MOVESCU", "+P",
                          str(filled_node.move_port), "+xa", "-aec", "CYTONODE", "-od", str(out),
                          "127.0.0.1", str(filled_node.node.port), "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={SLIDE_STUDY}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    headers = filled_node.headers()
    wanted = {uid for uid, h in headers.items() if h.StudyInstanceUID == SLIDE_STUDY}
    got = {dataset_digest(p)[0]: p for p in out.iterdir()}
    assert set(got) == wanted
    for uid in wanted:  # JPEG frames arrive as stored, in the stored transfer syntax
        assert dataset_digest(got[uid]) == dataset_digest(filled_node.sent[uid])


def test_move_to_unknown_ae_is_refused(filled_node: FilledNode, tmp_path: Path) -> None:
    movescu = require_tool("movescu")
    run = subprocess.run([movescu, "-S", "-aet", "MOVESCU", "-aem", "NOBODY", "-aec", "CYTONODE",
                          "127.0.0.1", str(filled_node.node.port), "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={SLIDE_STUDY}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert "MoveDestinationUnknown" in run.stdout + run.stderr
    assoc = _assoc(filled_node, StudyRootQueryRetrieveInformationModelMove)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", SLIDE_STUDY
        statuses = _statuses(assoc.send_c_move(ds, "NOBODY", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert statuses == [Q.MOVE_DESTINATION_UNKNOWN]
