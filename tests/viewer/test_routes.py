"""Every viewer route through the Flask test client, on a real node's analysed sample slide:
login required, CSRF refused, roles enforced, unknown ids 404, no stack traces, and the store
state each change leaves behind."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess

import highdicom as hd
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from sqlalchemy import select

from dicom_node.store.index import Instance, OutboxItem
from tests.viewer.conftest import PASSWORD, login, login_form_token, wait_for_pacs
from viewer import cases
from viewer.auth import add_user
from viewer.models import AuditEvent, CaseVersion


def _routes(uid: str, cell: int) -> list[tuple[str, str]]:
    return [
        ("GET", "/"), ("GET", "/api/worklist"), ("GET", "/api/me"), ("GET", "/admin/users"),
        ("POST", "/admin/users"), ("GET", "/audit"), ("GET", "/audit.csv"),
        ("GET", f"/slides/{uid}"), ("GET", f"/api/slides/{uid}/info"),
        ("GET", f"/api/slides/{uid}/tiles/0/0_0.jpg"),
        ("GET", f"/api/slides/{uid}/heatmaps/anomaly.png"),
        ("GET", f"/cases/{uid}"), ("GET", f"/api/cases/{uid}"),
        ("GET", f"/api/cases/{uid}/cells/{cell}/crop.jpg"),
        ("GET", f"/api/cases/{uid}/cells/{cell}/heatmap.jpg"),
        ("POST", f"/api/cases/{uid}/cells/{cell}"), ("POST", f"/api/cases/{uid}/undo"),
        ("POST", f"/api/cases/{uid}/cells/{cell}/seen"),
        ("GET", f"/cases/{uid}/signoff"), ("POST", f"/cases/{uid}/signoff"),
        ("POST", f"/cases/{uid}/amend"), ("GET", f"/api/cases/{uid}/versions"),
        ("POST", "/logout"),
    ]


def _first_cell(node_case) -> int:
    return int(cases.load_summary(node_case.settings, node_case.series_instance_uid)
               ["cells"][0]["cell_id"])


def _no_trace(rsp) -> None:
    body = rsp.get_data(as_text=True)
    assert "Traceback" not in body and 'File "' not in body


def test_healthz_is_public(app) -> None:
    rsp = app.test_client().get("/healthz")
    assert rsp.status_code == 200 and rsp.get_json() == {"status": "ok"}


def test_every_route_needs_a_login(app, node_case) -> None:
    client = app.test_client()
    for method, url in _routes(node_case.series_instance_uid, _first_cell(node_case)):
        rsp = client.open(url, method=method)
        if method == "GET" and not url.startswith("/api/"):
            assert rsp.status_code == 302, url
            assert rsp.location.startswith("/login"), url
        elif method == "GET":
            assert rsp.status_code == 401, (method, url)
            assert rsp.get_json()["code"] == 401
        else:  # refused: no session, so no CSRF token either (the CSRF check comes first)
            assert rsp.status_code in (400, 401), (method, url)
        _no_trace(rsp)


def test_login_refuses_a_missing_or_wrong_csrf_token(app) -> None:
    client = app.test_client()
    client.get("/login")
    for data in ({"username": "path", "password": PASSWORD},
                 {"username": "path", "password": PASSWORD, "csrf_token": "forged"}):
        rsp = client.post("/login", data=data)
        assert rsp.status_code == 400
        _no_trace(rsp)
    with client.session_transaction() as sess:
        assert "user_id" not in sess


def test_session_holds_the_contract_for_dicomweb(client_as) -> None:
    client, token = client_as("path")
    with client.session_transaction() as sess:
        assert isinstance(sess["user_id"], int)
        assert (sess["username"], sess["role"], sess["csrf_token"]) == ("path", "pathologist", token)
    assert client.get("/api/me").get_json()["role"] == "pathologist"


def test_wrong_password_and_throttling(app, node_case) -> None:
    add_user(app.extensions["cytonode.store"], "locked", "technologist", "right password")
    client = app.test_client()
    token = login_form_token(client)
    for _ in range(5):
        rsp = client.post("/login", data={"username": "locked", "password": "wrong",
                                          "csrf_token": token})
        assert rsp.status_code == 401
    rsp = client.post("/login", data={"username": "locked", "password": "right password",
                                      "csrf_token": token})
    assert rsp.status_code == 429  # throttled even with the right password


def test_login_redirects_only_to_local_paths(app) -> None:
    client = app.test_client()
    token = login_form_token(client)
    rsp = client.post("/login?next=https://evil.example/", data={
        "username": "tech", "password": PASSWORD, "csrf_token": token})
    assert rsp.status_code == 302 and rsp.location == "/"


def test_state_changing_requests_without_csrf_are_refused(client_as, node_case) -> None:
    uid, cell = node_case.series_instance_uid, _first_cell(node_case)
    client, _ = client_as("path")
    for url, kwargs in ((f"/api/cases/{uid}/cells/{cell}", {"json": {"label": "monocyte"}}),
                        (f"/api/cases/{uid}/undo", {}),
                        (f"/cases/{uid}/signoff", {"data": {"password": PASSWORD}}),
                        (f"/cases/{uid}/amend", {"data": {"reason": "x"}}),
                        ("/logout", {})):
        rsp = client.post(url, headers={"X-CSRF-Token": "forged"}, **kwargs)
        assert rsp.status_code == 400, url
        _no_trace(rsp)
    admin, _ = client_as("admin")
    rsp = admin.post("/admin/users", data={"username": "x", "role": "admin", "password": "12345678"})
    assert rsp.status_code == 400
    assert client.get("/api/me").status_code == 200  # still logged in: the logout was refused


def test_roles_are_enforced(client_as, node_case) -> None:
    uid, cell = node_case.series_instance_uid, _first_cell(node_case)
    tech, tech_token = client_as("tech")
    assert tech.get(f"/cases/{uid}/signoff").status_code == 403
    assert tech.post(f"/cases/{uid}/signoff", data={"password": PASSWORD, "csrf_token": tech_token}
                     ).status_code == 403
    assert tech.post(f"/cases/{uid}/amend", data={"reason": "x", "csrf_token": tech_token}
                     ).status_code == 403
    for url in ("/audit", "/audit.csv", "/admin/users"):
        assert tech.get(url).status_code == 403
    admin, admin_token = client_as("admin")
    rsp = admin.post(f"/api/cases/{uid}/cells/{cell}", json={"label": "monocyte"},
                     headers={"X-CSRF-Token": admin_token})
    assert rsp.status_code == 403 and rsp.get_json()["code"] == 403
    assert admin.get(f"/cases/{uid}/signoff").status_code == 403
    # looking at a cell counts for a reviewer only
    assert admin.post(f"/api/cases/{uid}/cells/{cell}/seen",
                      headers={"X-CSRF-Token": admin_token}).status_code == 403


def test_unknown_ids_give_404(client_as, node_case) -> None:
    uid = node_case.series_instance_uid
    client, token = client_as("path")
    for url in ("/slides/1.2.3.4", "/cases/1.2.3.4", "/api/cases/1.2.3.4", "/slides/not-a-uid",
                "/api/slides/..%2F..%2Fetc/info", f"/api/cases/{uid}/cells/99999/crop.jpg",
                f"/api/cases/{uid}/cells/99999/heatmap.jpg", f"/api/slides/{uid}/tiles/0/99_0.jpg",
                f"/api/slides/{uid}/tiles/40/0_0.jpg", f"/api/slides/{uid}/heatmaps/nope.png",
                "/api/slides/1.2.3.4/tiles/0/0_0.jpg", f"/api/cases/{uid}/versions/x",
                "/vendor/openseadragon/../../package.json", "/api/cases/1.2.3.4/versions"):
        rsp = client.get(url)
        assert rsp.status_code == 404, url
        _no_trace(rsp)
        if url.startswith("/api/"):
            assert rsp.get_json()["code"] == 404
    rsp = client.post(f"/api/cases/{uid}/cells/99999", json={"label": "monocyte"},
                      headers={"X-CSRF-Token": token})
    assert rsp.status_code == 404


def test_bad_input_gives_400_without_a_trace(client_as, node_case) -> None:
    uid, cell = node_case.series_instance_uid, _first_cell(node_case)
    client, token = client_as("tech")
    for body in ({"label": "<script>"}, {"abnormal": "maybe"}, {}, {"unclassifiable": 3}):
        rsp = client.post(f"/api/cases/{uid}/cells/{cell}", json=body, headers={"X-CSRF-Token": token})
        assert rsp.status_code in (400, 409), body  # 409 once the browser test signed the case
        _no_trace(rsp)
    for query in ("sort=evil", "order=sideways", "status=nope"):
        rsp = client.get(f"/api/worklist?{query}")
        assert rsp.status_code == 400
        assert rsp.get_json()["code"] == 400


def test_worklist_lists_the_slide_with_status_and_counts(client_as, node_case) -> None:
    client, _ = client_as("tech")
    assert "Worklist" in client.get("/").get_data(as_text=True)
    rows = client.get("/api/worklist").get_json()["cases"]
    assert [r["series_instance_uid"] for r in rows] == [node_case.series_instance_uid]
    row = rows[0]
    assert row["status"] in ("ready for review", "signed")
    assert row["patient_id"] == "CYTO-SAMPLE" and row["cell_count"] == node_case.job["result"]["cell_count"]
    assert row["flagged"] == node_case.job["result"]["review"]
    assert client.get("/api/worklist?q=nobody").get_json()["cases"] == []
    assert len(client.get("/api/worklist?q=cyto-sample&sort=patient_name&order=asc")
               .get_json()["cases"]) == 1
    status = row["status"]
    assert len(client.get(f"/api/worklist?status={status}").get_json()["cases"]) == 1
    other = "failed"
    assert client.get(f"/api/worklist?status={other}").get_json()["cases"] == []


def test_tiles_pass_the_stored_jpeg_frames_through(client_as, node_case, app) -> None:
    uid = node_case.series_instance_uid
    client, _ = client_as("tech")
    info = client.get(f"/api/slides/{uid}/info").get_json()
    assert (info["width"], info["height"]) == (2308, 1154)
    assert info["stored_levels"] == [0, 1, 2, 3, 4] and info["min_level"] == info["max_level"] - 4
    store = app.extensions["cytonode.store"]
    with store.session() as db:
        paths = [store.path_of(i) for i in db.scalars(select(Instance).where(
            Instance.series_instance_uid == uid)).all()]
    base = max((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.TotalPixelMatrixColumns))
    frames = list(generate_frames(base.PixelData, number_of_frames=int(base.NumberOfFrames)))
    columns = -(-int(base.TotalPixelMatrixColumns) // int(base.Columns))
    for col, row in ((0, 0), (3, 2), (9, 4)):  # (9, 4): the bottom right edge tile
        rsp = client.get(f"/api/slides/{uid}/tiles/0/{col}_{row}.jpg")
        assert rsp.status_code == 200 and rsp.mimetype == "image/jpeg"
        assert rsp.headers["X-Tile-Source"] == "stored-frame"
        # byte for byte (up to the fragment's even-length padding): not decoded, not re-encoded
        assert rsp.data.rstrip(b"\x00") == frames[row * columns + col].rstrip(b"\x00")
    rsp = client.get(f"/api/slides/{uid}/tiles/5/0_0.jpg")  # coarser than any stored level
    assert rsp.headers["X-Tile-Source"] == "rendered"
    assert Image.open(io.BytesIO(rsp.data)).size in ((72, 36), (73, 37))  # 2308 x 1154 / 32


def test_heatmaps_crops_and_case_json(client_as, node_case) -> None:
    uid = node_case.series_instance_uid
    client, _ = client_as("tech")
    summary = cases.load_summary(node_case.settings, uid)
    for heatmap in summary["heatmaps"]:
        rsp = client.get(f"/api/slides/{uid}/heatmaps/{heatmap['kind']}.png")
        assert rsp.status_code == 200
        assert Image.open(io.BytesIO(rsp.data)).size == tuple(reversed(heatmap["shape"]))
    case = client.get(f"/api/cases/{uid}").get_json()
    assert len(case["cells"]) == summary["cell_count"]
    assert sum(r["count"] for r in case["differential"]) == summary["cell_count"] - sum(
        1 for c in case["cells"] if c["unclassifiable"])
    flagged = [c["flagged"] for c in case["cells"]]
    for cell in case["cells"]:
        assert client.get(f"/api/cases/{uid}/cells/{cell['cell_id']}/crop.jpg").status_code == 200
        rsp = client.get(f"/api/cases/{uid}/cells/{cell['cell_id']}/heatmap.jpg")
        assert Image.open(io.BytesIO(rsp.data)).size == (128, 128)
    assert flagged  # gallery order: grouped by class, flagged first inside a class
    page = client.get(f"/cases/{uid}").get_data(as_text=True)
    assert "review.js" in page and "1</kbd>" in page


def _open_version(client, token: str, uid: str) -> None:
    """Make sure the case has an open version (amend when a signed one is there)."""
    if client.get(f"/api/cases/{uid}").get_json()["signed"]:
        rsp = client.post(f"/cases/{uid}/amend", data={"reason": "", "csrf_token": token})
        assert rsp.status_code == 400  # an amendment needs a reason
        rsp = client.post(f"/cases/{uid}/amend", data={"reason": "re-review", "csrf_token": token})
        assert rsp.status_code == 302


def test_reclassify_mark_and_undo(client_as, node_case) -> None:
    uid, cell = node_case.series_instance_uid, _first_cell(node_case)
    path_client, path_token = client_as("path")
    _open_version(path_client, path_token, uid)
    client, token = client_as("tech")
    headers = {"X-CSRF-Token": token}
    before = client.get(f"/api/cases/{uid}").get_json()
    current = next(c for c in before["cells"] if c["cell_id"] == cell)
    target = "monocyte" if current["label"] != "monocyte" else "lymphocyte"
    after = client.post(f"/api/cases/{uid}/cells/{cell}", json={"label": target}, headers=headers
                        ).get_json()
    row = next(r for r in after["differential"] if r["label"] == target)
    old_row = next(r for r in before["differential"] if r["label"] == target)
    assert row["count"] == old_row["count"] + 1
    assert next(c for c in after["cells"] if c["cell_id"] == cell)["label"] == target
    marked = client.post(f"/api/cases/{uid}/cells/{cell}", data={
        "unclassifiable": "true", "csrf_token": token}).get_json()
    assert sum(r["count"] for r in marked["differential"]) == sum(
        r["count"] for r in after["differential"]) - 1
    undone = client.post(f"/api/cases/{uid}/undo", headers=headers).get_json()
    assert not next(c for c in undone["cells"] if c["cell_id"] == cell)["unclassifiable"]
    undone = client.post(f"/api/cases/{uid}/undo", headers=headers).get_json()
    assert next(c for c in undone["cells"] if c["cell_id"] == cell)["label"] == current["label"]


def test_signoff_issues_a_verified_final_sr_that_reaches_the_pacs(client_as, node_case, app) -> None:
    uid, cell = node_case.series_instance_uid, _first_cell(node_case)
    store = app.extensions["cytonode.store"]
    client, token = client_as("path")
    _open_version(client, token, uid)
    case = client.get(f"/api/cases/{uid}").get_json()
    current = next(c for c in case["cells"] if c["cell_id"] == cell)
    target = "eosinophil" if current["label"] != "eosinophil" else "basophil"
    client.post(f"/api/cases/{uid}/cells/{cell}", json={"label": target, "abnormal": True},
                headers={"X-CSRF-Token": token})
    rsp = client.post(f"/cases/{uid}/signoff", data={"password": "wrong", "csrf_token": token})
    assert rsp.status_code == 403
    assert not client.get(f"/api/cases/{uid}").get_json()["signed"]
    before = client.get(f"/api/cases/{uid}/versions").get_json()["versions"]
    # flagged cells nobody looked at: the form asks, the server refuses without the confirmation
    case = client.get(f"/api/cases/{uid}").get_json()
    unreviewed = case["unreviewed_flagged"]
    assert unreviewed and cell not in unreviewed  # the changed cell was looked at
    page = client.get(f"/cases/{uid}/signoff").get_data(as_text=True)
    assert 'name="confirm_unreviewed"' in page
    assert f"I sign with {len(unreviewed)} flagged cell" in page
    for cell_id in unreviewed:
        assert f"#cell-{cell_id}\">Cell {cell_id}</a>" in page
    rsp = client.post(f"/cases/{uid}/signoff", data={"password": PASSWORD, "csrf_token": token})
    assert rsp.status_code == 409
    assert f"{len(unreviewed)} flagged cell{'s' if len(unreviewed) != 1 else ''} not reviewed: confirm" \
        in rsp.get_data(as_text=True)
    assert not client.get(f"/api/cases/{uid}").get_json()["signed"]
    rsp = client.post(f"/cases/{uid}/signoff", data={"password": PASSWORD, "csrf_token": token,
                                                      "confirm_unreviewed": "yes"},
                      headers={"Accept": "application/json"})
    assert rsp.status_code == 200, rsp.get_data(as_text=True)
    signed = rsp.get_json()
    # read-only now; a second signature is a conflict
    assert client.post(f"/api/cases/{uid}/cells/{cell}", json={"label": "ig"},
                       headers={"X-CSRF-Token": token}).status_code == 409
    assert client.post(f"/cases/{uid}/signoff", data={"password": PASSWORD, "csrf_token": token}
                       ).status_code == 409
    # stored, queued for the PACS together with the preliminary objects, and delivered
    summary = cases.load_summary(node_case.settings, uid)
    with store.session() as db:
        queued = set(db.scalars(select(OutboxItem.sop_instance_uid)).all())
    assert {signed["sop_instance_uid"], *(f["sop_instance_uid"] for f in summary["files"].values())} <= queued
    path = wait_for_pacs(node_case.pacs, signed["sop_instance_uid"])
    report = hd.sr.srread(path)
    assert (report.CompletionFlag, report.VerificationFlag, report.PreliminaryFlag) == (
        "COMPLETE", "VERIFIED", "FINAL")
    observer = report.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "path^" and observer.VerifyingOrganization
    assert observer.VerificationDateTime
    predecessors = {str(i.ReferencedSOPInstanceUID) for s in report.PredecessorDocumentsSequence
                    for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert summary["files"]["sr"]["sop_instance_uid"] in predecessors
    earlier = [v["sr_sop_instance_uid"] for v in before if v["sr_sop_instance_uid"]]
    assert set(earlier) <= predecessors  # an amendment names the version it replaces
    assert int(report.InstanceNumber) == signed["version"]
    text = str(report)
    assert "Class assigned by the algorithm" in text and f"Cell {cell}" in text
    # the confirmation is in the report and in the audit log
    group = report.content.get_image_measurement_groups()[0]
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Number of flagged cells not reviewed"] == len(unreviewed)
    assert {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}[
        "Signed with flagged cells not reviewed"] == "Yes"
    with store.session() as db:
        details = [e.detail for e in db.scalars(select(AuditEvent).where(
            AuditEvent.action == "sign_unreviewed", AuditEvent.target == uid)).all()]
    assert details[-1] == (f"version {signed['version']}: signed with {len(unreviewed)} flagged cells not "
                           f"reviewed (confirmed by the signer): cells {', '.join(map(str, unreviewed))}")
    assert report.StudyInstanceUID == node_case.study_instance_uid
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False,
                             timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == []
    with store.session() as db:
        version = db.scalar(select(CaseVersion).where(
            CaseVersion.series_instance_uid == uid, CaseVersion.version == signed["version"]))
        assert version.signed_at and version.sr_sop_instance_uid == signed["sop_instance_uid"]
    assert client.get("/api/worklist").get_json()["cases"][0]["status"] == "signed"


def test_audit_log_and_csv_export(client_as, node_case, app) -> None:
    # A failed login of its own: the app is shared by the session, and which other tests ran on
    # this worker before this one depends on pytest-xdist's scheduling.
    add_user(app.extensions["cytonode.store"], "audited", "technologist", "right password")
    stranger = app.test_client()
    token = login_form_token(stranger)
    rsp = stranger.post("/login", data={"username": "audited", "password": "wrong", "csrf_token": token})
    assert rsp.status_code == 401
    client, _ = client_as("tech")
    client.get(f"/slides/{node_case.series_instance_uid}")
    admin, _ = client_as("admin")
    page = admin.get("/audit?user=tech")
    assert page.status_code == 200 and "view" in page.get_data(as_text=True)
    rsp = admin.get("/audit.csv")
    assert rsp.status_code == 200 and rsp.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(rsp.get_data(as_text=True))))
    actions = {r["action"] for r in rows}
    assert {"login", "view", "login_failed"} <= actions
    with app.extensions["cytonode.store"].session() as db:
        assert db.scalar(select(AuditEvent).where(AuditEvent.action == "export")) is not None


def test_admin_adds_users_and_names_stay_text(client_as) -> None:
    admin, token = client_as("admin")
    rsp = admin.post("/admin/users", data={"username": "<b>eve</b>", "role": "technologist",
                                           "password": "long enough", "csrf_token": token})
    assert rsp.status_code == 200
    body = rsp.get_data(as_text=True)
    assert "&lt;b&gt;eve&lt;/b&gt;" in body and "<b>eve</b>" not in body  # escaped
    rsp = admin.post("/admin/users", data={"username": "<b>eve</b>", "role": "technologist",
                                           "password": "long enough", "csrf_token": token})
    assert rsp.status_code == 400  # taken
    rsp = admin.post("/admin/users", data={"username": "mallory", "role": "root",
                                           "password": "long enough", "csrf_token": token})
    assert rsp.status_code == 400
    client = admin.application.test_client()
    assert login(client, "<b>eve</b>", "long enough")


def test_logout_ends_the_session(client_as) -> None:
    client, token = client_as("tech")
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/api/me").status_code == 401


@pytest.mark.parametrize("name", ["", "a^b", "x" * 65, " padded"])
def test_bad_user_names_are_refused(app, name: str) -> None:
    with pytest.raises(ValueError):
        add_user(app.extensions["cytonode.store"], name, "admin", "long enough")


def test_user_add_command_refuses_a_short_password(node_case) -> None:
    from tests.peers import CYTONODE

    out = subprocess.run([CYTONODE, "user", "add", "shorty", "--role", "pathologist",
                          "--password-stdin"], input="short\n", env=dict(node_case.node.env),
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "cytonode user: password must have at least 8 characters"]


def test_case_pages_name_the_patient_and_state_the_differential(client_as, node_case, app) -> None:
    uid = node_case.series_instance_uid
    client, _ = client_as("path")
    summary = cases.load_summary(node_case.settings, uid)
    report = summary["report"]
    flag_text = node_case.job["result"]["report"]["text"]["flags"]
    assert flag_text.startswith(f"{sum(c['review'] for c in summary['cells'])} flagged for review")
    row = client.get("/api/worklist").get_json()["cases"][0]
    assert row["flag_text"] == flag_text and row["flagged"] == report["flagged"]
    for url in (f"/slides/{uid}", f"/cases/{uid}", f"/cases/{uid}/signoff"):
        page = client.get(url).get_data(as_text=True)
        for text in ('id="patient-name">BCCD Anonymous<', 'id="patient-id">CYTO-SAMPLE<',
                     'id="accession-number">CYTO0001<',
                     'id="slide-id">CYTO-SAMPLE-0001 (specimen CYTO-SAMPLE-0001-S1)<',
                     f'id="flag-count">{flag_text}<'):
            assert text in page, (url, text)
        # white cells only, NRBC per 100 white cells, platelets apart, the caution under 100
        assert f"White-cell differential on {report['white_cells']} white cells" in page
        assert (f"differential on {report['white_cells']} white cells (fewer than 100): "
                "interpret with caution") in page
        assert "per 100 white cells" in page and "nucleated red cells (erythroblasts): " in page
        assert (f"platelets: {report['platelets']['seen']} seen (an estimate; not white cells, "
                "not in the differential)") in page
        assert "immature granulocyte" in page and ">ig<" not in page
        assert 'data-label="erythroblast"' not in page and 'data-label="platelet"' not in page
        # the slide check and the thresholds' site calibration, as the job recorded them
        assert node_case.job["result"]["validated_domain"] == "inside the validated domain"
        assert ('id="domain-check">inside the validated domain · site calibration: none<' in page
                and "domain-alert" not in page), url
    case = client.get(f"/api/cases/{uid}").get_json()
    assert case["class_names"]["ig"] == "immature granulocyte"
    assert case["report"]["note"] and case["report"]["white_cells"] == report["white_cells"]
    flagged = [c for c in case["cells"] if c["flagged"]]
    assert flagged == [c for c in case["cells"] if c["review"]]
    assert all(c["review_labels"] for c in flagged)


def test_looking_at_a_flagged_cell_is_recorded(client_as, node_case) -> None:
    uid = node_case.series_instance_uid
    client, token = client_as("tech")
    case = client.get(f"/api/cases/{uid}").get_json()
    assert client.post(f"/api/cases/{uid}/cells/99999/seen",
                       headers={"X-CSRF-Token": token}).status_code == 404
    for cell_id in case["unreviewed_flagged"]:
        rsp = client.post(f"/api/cases/{uid}/cells/{cell_id}/seen", headers={"X-CSRF-Token": token})
        assert rsp.status_code == 200 and rsp.get_json()["looked_at"] is True
        assert client.post(f"/api/cases/{uid}/cells/{cell_id}/seen",  # once is enough
                           headers={"X-CSRF-Token": token}).status_code == 200
    after = client.get(f"/api/cases/{uid}").get_json()
    assert after["unreviewed_flagged"] == []
    assert all(c["looked_at"] for c in after["cells"] if c["flagged"])
    path, _ = client_as("path")
    page = path.get(f"/cases/{uid}/signoff").get_data(as_text=True)
    if not after["signed"]:
        assert 'name="confirm_unreviewed"' not in page and "Every flagged cell was looked at." in page
