from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dicom_node.errors import SettingsError
from dicom_node.settings import (
    Destination,
    DuplicatePolicyValues,
    ReleasePolicyValues,
    RoutingRule,
    Settings,
)


def test_environment_and_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "FROMTOML"\nstable_age_s = 5\n'
                      'routing_rules = [{modality = "SM", image_type = "VOLUME"}]\n'
                      'destinations = ["PACS@10.0.0.1:104"]\n')
    s = Settings.from_env({"CYTONODE_CONFIG": str(config), "CYTONODE_STABLE_AGE_S": "2.5",
                           "CYTONODE_ALLOWED_AES": "ORTHANC, STORESCU",
                           "CYTONODE_RELEASE_POLICY": "final-only", "OTHER": "ignored"})
    assert s.ae_title == "FROMTOML"
    assert s.stable_age_s == 2.5  # the environment wins over the file
    assert s.allowed_aes == ("ORTHANC", "STORESCU")
    assert s.destinations == (Destination("PACS", "10.0.0.1", 104),)
    assert s.routing_rules == (RoutingRule(modality="SM", image_type="VOLUME"),)
    assert s.release_policy is ReleasePolicyValues.FINAL_ONLY
    assert s.duplicate_policy is DuplicatePolicyValues.KEEP


@pytest.mark.parametrize("env, message", [
    ({"CYTONODE_AE_TITLE": "WAY_TOO_LONG_AE_TITLE"}, "AE title"),
    ({"CYTONODE_DICOM_PORT": "70000"}, "out of range"),
    ({"CYTONODE_DESTINATIONS": "PACS@host"}, "AE@host:port"),
    ({"CYTONODE_RELEASE_POLICY": "sometimes"}, "release_policy must be one of"),
    ({"CYTONODE_STABLE_AGE_S": "soon"}, "stable_age_s"),
    ({"CYTONODE_MAX_INFLATED_BYTES": "65536"}, "max_inflated_bytes must be at least 1 MiB"),
    ({"CYTONODE_NO_SUCH_THING": "1"}, "unknown setting"),
])
def test_invalid_settings_name_the_rule(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_settings_reach_a_spawned_worker_unchanged() -> None:
    # the embedded worker is a spawned process that receives the object itself (pickled)
    s = Settings.from_env({"CYTONODE_DESTINATIONS": "A@h:1,B@[::1]:2", "CYTONODE_ALLOWED_AES": "X,Y",
                           "CYTONODE_ROUTING_RULES": '[{"modality": "SM"}]',
                           "CYTONODE_REQUIRE_CALLED_AE": "false", "CYTONODE_DATA_DIR": "/d",
                           "CYTONODE_DEVICE": "cpu", "CYTONODE_RELEASE_POLICY": "final-only"})
    assert pickle.loads(pickle.dumps(s)) == s


def test_redacted_hides_passwords() -> None:
    s = Settings.from_env({"CYTONODE_DATABASE_URL": "postgresql://node:s3cret@db/cytonode",
                           "CYTONODE_BROKER_URL": "redis://:pw@broker:6379/0"})
    text = str(s.redacted())
    assert "s3cret" not in text and "pw@" not in text
    assert "postgresql://node:***@db/cytonode" in text


def test_serve_refuses_bad_settings_with_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    cytonode = str(Path(sys.executable).with_name("cytonode"))
    out = subprocess.run([cytonode, "serve"], env={"CYTONODE_DICOM_PORT": "-4",
                                                    "CYTONODE_DATA_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "dicom_port" in out.stderr and "Traceback" not in out.stderr


def test_tls_settings_round_trip_and_destination_marker(tmp_path: Path) -> None:
    for name in ("node.pem", "node.key", "ca.pem"):
        (tmp_path / name).write_text("PEM")  # contents are checked when the node starts
    s = Settings.from_env({"CYTONODE_TLS_CERTIFICATE": str(tmp_path / "node.pem"),
                           "CYTONODE_TLS_KEY": str(tmp_path / "node.key"),
                           "CYTONODE_TLS_CA": str(tmp_path / "ca.pem"),
                           "CYTONODE_TLS_REQUIRE_CLIENT_CERTIFICATE": "yes",
                           "CYTONODE_DESTINATIONS": "PACS@pacs.example:2762+tls,OLD@[::1]:104"})
    assert s.tls_enabled and s.tls_require_client_certificate
    assert s.destinations == (Destination("PACS", "pacs.example", 2762, tls=True),
                              Destination("OLD", "::1", 104))
    assert [str(d) for d in s.destinations] == ["PACS@pacs.example:2762+tls", "OLD@[::1]:104"]
    assert pickle.loads(pickle.dumps(s)) == s
    assert not Settings().tls_enabled


@pytest.mark.parametrize("env, message", [
    ({"CYTONODE_TLS_CERTIFICATE": "{d}/node.pem"}, "tls_certificate and tls_key must be set together"),
    ({"CYTONODE_TLS_KEY": "{d}/node.key"}, "tls_certificate and tls_key must be set together"),
    ({"CYTONODE_TLS_CERTIFICATE": "{d}/node.pem", "CYTONODE_TLS_KEY": "{d}/node.key",
      "CYTONODE_TLS_REQUIRE_CLIENT_CERTIFICATE": "true"}, "needs tls_certificate, tls_key and tls_ca"),
    ({"CYTONODE_TLS_CERTIFICATE": "{d}/missing.pem", "CYTONODE_TLS_KEY": "{d}/node.key"},
     "tls_certificate: .*missing.pem' is not a file"),
    ({"CYTONODE_DESTINATIONS": "PACS@host:104+ssl"}, "AE@host:port or AE@host:port\\+tls"),
])
def test_invalid_tls_settings_name_the_rule(tmp_path: Path, env: dict[str, str], message: str) -> None:
    for name in ("node.pem", "node.key"):
        (tmp_path / name).write_text("PEM")
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({k: v.format(d=tmp_path) for k, v in env.items()})


def test_unreadable_certificate_stops_serve_with_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "node.pem").write_text("not a certificate")
    (tmp_path / "node.key").write_text("not a key")
    cytonode = str(Path(sys.executable).with_name("cytonode"))
    out = subprocess.run([cytonode, "serve"], env={"CYTONODE_DATA_DIR": str(tmp_path / "data"),
                                                    "CYTONODE_TLS_CERTIFICATE": str(tmp_path / "node.pem"),
                                                    "CYTONODE_TLS_KEY": str(tmp_path / "node.key"),
                                                    "CYTONODE_DICOM_PORT": "0", "CYTONODE_HTTP_PORT": "0",
                                                    "CYTONODE_WORKERS": "0"},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot load tls_certificate" in out.stderr and "Traceback" not in out.stderr
