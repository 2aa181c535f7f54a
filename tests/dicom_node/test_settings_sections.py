"""The settings' typed sections: every setting belongs to exactly one, and the analysis and the
encoders take theirs from the environment like every other setting."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from dicom_node.errors import SettingsError
from dicom_node.settings import (
    AnalysisSection,
    EncoderSection,
    JobsSection,
    NetworkSection,
    Settings,
    StorageSection,
    WebSection,
)

SECTIONS = (NetworkSection, StorageSection, JobsSection, AnalysisSection, EncoderSection, WebSection)


def test_every_setting_is_in_exactly_one_section() -> None:
    seen: dict[str, str] = {}
    for section in SECTIONS:
        for field in dataclasses.fields(section):
            assert field.name not in seen, f"{field.name} is in {seen.get(field.name)} and {section.__name__}"
            seen[field.name] = section.__name__
    assert set(seen) == {f.name for f in dataclasses.fields(Settings)}


def test_analysis_and_encoder_sections_come_from_the_environment(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    settings = Settings.from_env({
        "CYTONODE_DATA_DIR": str(tmp_path), "CYTONODE_DEVICE": "cpu",
        "CYTONODE_WEIGHTS_DIR": str(weights), "CYTONODE_CLASSIFIER_TIMESTEPS": "12",
        "CYTONODE_HEATMAPS": "off", "CYTONODE_INSTITUTION_NAME": "Haematology, St Elsewhere",
        "CYTONODE_SR_SERIES_NUMBER": "950"})
    assert settings.analysis == AnalysisSection(weights_dir=str(weights), device=settings.device,
                                                classifier_timesteps=12, heatmaps=False,
                                                site_calibration="")
    assert settings.analysis.resolved_device() == "cpu"
    params = settings.encoder.params()
    assert params.institution_name == "Haematology, St Elsewhere"
    assert (params.sr_series_number, params.ann_series_number, params.seg_series_number) == (950, 901, 902)
    # A worker receives the object itself (pickled by multiprocessing), sections and all.
    assert pickle.loads(pickle.dumps(settings)).analysis == settings.analysis


@pytest.mark.parametrize("env, words", [
    ({"CYTONODE_ANN_SERIES_NUMBER": "900"}, "must differ"),
    ({"CYTONODE_CLASSIFIER_TIMESTEPS": "1"}, "classifier_timesteps"),
    ({"CYTONODE_WEIGHTS_DIR": "/no/such/folder"}, "weights_dir"),
    ({"CYTONODE_DEVICE_SERIAL_NUMBER": "a\\b"}, "backslash"),
])
def test_bad_section_values_are_refused_with_the_setting_named(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)
