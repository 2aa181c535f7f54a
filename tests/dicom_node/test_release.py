"""The release rule (dicom_node.store.outbox): which results go out when a job is done and
which when its case is signed, under each release policy."""

from __future__ import annotations

from pathlib import Path

from dicom_node.settings import ReleasePolicyValues, Settings
from dicom_node.store.outbox import release_when_analysed, release_when_signed

PRELIMINARY = ["1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"]
FINAL = ["1.2.826.0.1.3680043.10.1.3", "1.2.826.0.1.3680043.10.1.4"]


def test_immediate_releases_the_preliminary_results_when_the_job_is_done(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, release_policy=ReleasePolicyValues.IMMEDIATE)
    assert release_when_analysed(settings, PRELIMINARY) == PRELIMINARY


def test_final_only_holds_them_until_sign_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, release_policy=ReleasePolicyValues.FINAL_ONLY)
    assert release_when_analysed(settings, PRELIMINARY) == []


def test_sign_off_releases_the_preliminary_and_the_final_objects() -> None:
    # under either policy: under immediate the preliminary ones are queued already, and
    # Store.enqueue adds no second row for them
    assert release_when_signed(PRELIMINARY, FINAL) == [*PRELIMINARY, *FINAL]
