"""The AE's contexts and statuses match the machine-readable table in conformance/."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.net.ae import make_ae
from dicom_node.settings import Settings
from dicom_node.status import QueryRetrieveStatusValues, StatusValues
from dicom_node.store.files import Store
from dicom_node.store.matching import MATCH_KEYS

CONFORMANCE = Path(__file__).parents[2] / "conformance"
TABLE = json.loads((CONFORMANCE / "contexts.json").read_text())


def _supported(tmp_path: Path) -> list:
    store = Store(Settings(data_dir=tmp_path))
    try:
        ae, _ = make_ae(Settings(data_dir=tmp_path), store)
    finally:
        store.close()
    return list(ae.supported_contexts)


def test_supported_contexts_match_conformance_table(tmp_path: Path) -> None:
    contexts = _supported(tmp_path)
    supported = {str(cx.abstract_syntax): sorted(map(str, cx.transfer_syntax)) for cx in contexts}
    storage = TABLE["scp"]["storage"]
    expected = {uid: sorted(storage["transfer_syntaxes"].values())
                for uid in storage["sop_classes"].values()}
    verification = TABLE["scp"]["verification"]
    expected[verification["sop_class_uid"]] = sorted(verification["transfer_syntaxes"])
    qr = TABLE["scp"]["query_retrieve"]
    for uid in qr["sop_classes"].values():
        expected[uid] = sorted(qr["transfer_syntaxes"])
    assert supported == expected
    # C-GET needs SCP/SCU role selection on every storage context.
    roles = {str(cx.abstract_syntax): (cx.scu_role, cx.scp_role) for cx in contexts}
    for uid in storage["sop_classes"].values():
        assert roles[uid] == (True, True)


def test_statuses_match_conformance_table() -> None:
    assert TABLE["c_store_statuses"] == {s.name: f"0x{s.value:04X}" for s in StatusValues}
    assert TABLE["query_retrieve_statuses"] == {
        s.name: f"0x{s.value:04X}" for s in QueryRetrieveStatusValues}
    keys = TABLE["scp"]["query_retrieve"]["matching_keys"]
    assert keys == {k: v[0].value for k, v in MATCH_KEYS.items()} | {"ModalitiesInStudy": "STUDY"}


def test_statement_lists_every_sop_class_and_transfer_syntax() -> None:
    statement = (CONFORMANCE / "CONFORMANCE_STATEMENT.md").read_text()
    storage = TABLE["scp"]["storage"]
    uids = [*storage["sop_classes"].values(), *storage["transfer_syntaxes"].values(),
            *TABLE["scp"]["query_retrieve"]["sop_classes"].values(),
            TABLE["scp"]["verification"]["sop_class_uid"]]
    missing = [uid for uid in uids if f"`{uid}`" not in statement]
    assert not missing, f"CONFORMANCE_STATEMENT.md does not list {missing}"
    for status in [*TABLE["c_store_statuses"].values(), *TABLE["query_retrieve_statuses"].values()]:
        assert status[2:] in statement, f"status {status} is not in the statement"
