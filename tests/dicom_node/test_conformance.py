"""The AE's contexts and statuses match the machine-readable table in conformance/."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.ae import make_ae
from dicom_node.settings import Settings
from dicom_node.status import StatusValues
from dicom_node.store import Store

TABLE = json.loads((Path(__file__).parents[2] / "conformance" / "contexts.json").read_text())


def test_supported_contexts_match_conformance_table(tmp_path: Path) -> None:
    store = Store(Settings(data_dir=tmp_path))
    try:
        ae, _ = make_ae(Settings(data_dir=tmp_path), store)
    finally:
        store.close()
    supported = {str(cx.abstract_syntax): sorted(map(str, cx.transfer_syntax))
                 for cx in ae.supported_contexts}
    storage = TABLE["scp"]["storage"]
    expected = {uid: sorted(storage["transfer_syntaxes"].values())
                for uid in storage["sop_classes"].values()}
    verification = TABLE["scp"]["verification"]
    expected[verification["sop_class_uid"]] = sorted(verification["transfer_syntaxes"])
    assert supported == expected


def test_statuses_match_conformance_table() -> None:
    assert TABLE["c_store_statuses"] == {s.name: f"0x{s.value:04X}" for s in StatusValues}
