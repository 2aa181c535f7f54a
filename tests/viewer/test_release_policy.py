"""Under the final-only release policy the preliminary objects wait for sign-off, then go with
the final SR. The node's stored slide and results are copied into a second data directory set to
final-only, as its worker would have left them there: stored, nothing queued."""

from __future__ import annotations

import shutil

from sqlalchemy import select

from dicom_node.app.web import make_web_app
from dicom_node.settings import ReleasePolicyValues, Settings
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, OutboxItem
from tests.viewer.conftest import PASSWORD, login
from viewer import cases
from viewer.auth import add_user


def test_final_only_sends_the_preliminary_objects_with_the_final_sr(node_case, app, tmp_path) -> None:
    uid = node_case.series_instance_uid
    source = app.extensions["cytonode.store"]
    summary = cases.load_summary(node_case.settings, uid)
    results = {f["sop_instance_uid"] for f in summary["files"].values()}
    settings = Settings(data_dir=tmp_path / "final-only", release_policy=ReleasePolicyValues.FINAL_ONLY,
                        destinations=node_case.settings.destinations)
    store = Store(settings)
    with source.session() as db:
        slide = [source.path_of(i) for i in db.scalars(select(Instance).where(
            Instance.series_instance_uid == uid)).all()]
        outputs = [source.path_of(db.get(Instance, u)) for u in results]
    for path in slide:
        store.ingest_file(path)
    for path in outputs:
        store.ingest_file(path, routing="local")
    shutil.copytree(node_case.settings.results_dir / uid, settings.results_dir / uid)
    add_user(store, "signer", "pathologist", PASSWORD)
    client = make_web_app(settings, store).test_client()
    token = login(client, "signer")
    with store.session() as db:
        assert db.scalars(select(OutboxItem)).all() == []  # held
    rsp = client.post(f"/cases/{uid}/signoff", data={"password": PASSWORD, "csrf_token": token,
                                                      "confirm_unreviewed": "yes"},
                      headers={"Accept": "application/json"})
    assert rsp.status_code == 200, rsp.get_data(as_text=True)
    final = rsp.get_json()["sop_instance_uid"]
    final_pdf = rsp.get_json()["pdf_sop_instance_uid"]  # the final PDF report goes with the final SR
    with store.session() as db:
        queued = {(i.sop_instance_uid, i.destination) for i in db.scalars(select(OutboxItem)).all()}
    destination = str(node_case.settings.destinations[0])
    assert queued == {(u, destination) for u in (*results, final, final_pdf)}
    store.close()
