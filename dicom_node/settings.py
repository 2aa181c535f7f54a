"""The node's settings: one frozen object built once from the environment.

Every value comes from an environment variable prefixed ``CYTONODE_`` or from
the optional TOML file named by ``CYTONODE_CONFIG`` (environment wins). This is
the only module that reads :data:`os.environ`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomllib

from dicom_node.errors import SettingsError

PREFIX = "CYTONODE_"
_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14})$")  # PS3.5 6.2 AE
VL_WSM = "1.2.840.10008.5.1.4.1.1.77.1.6"

#: The largest object the node accepts whole: a STOW-RS request body (the viewer's
#: ``MAX_CONTENT_LENGTH``). A deflated data set, which pydicom inflates in memory to read it,
#: may inflate to at most this by default (``max_inflated_bytes``).
MAX_OBJECT_BYTES = 2 * 1024 * 1024 * 1024


class ReleasePolicyValues(str, enum.Enum):
    """When results leave the node: at once as preliminary, or only after sign-off."""

    IMMEDIATE = "immediate"
    FINAL_ONLY = "final-only"


class DuplicatePolicyValues(str, enum.Enum):
    """What to do when a SOP Instance UID arrives again with different content."""

    KEEP = "keep"
    OVERWRITE = "overwrite"


class DeviceValues(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def check_ae_title(value: str, name: str) -> str:
    """Return ``value`` if it is a valid AE title (PS3.5 6.2), else raise."""
    if not _AE_RE.match(value) or value != value.strip():
        raise SettingsError(f"{name}: {value!r} is not a valid AE title (1-16 characters, no backslash)")
    return value


@dataclasses.dataclass(frozen=True)
class Destination:
    """A peer that receives what the node creates, written ``AE@host:port``, or
    ``AE@host:port+tls`` for a peer reached over DICOM TLS (PS3.15 B.9)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "destination AE title")
        if not 0 < self.port < 65536:
            raise SettingsError(f"destination port {self.port} is out of range")
        if not self.host or any(c.isspace() for c in self.host):
            raise SettingsError(f"destination host {self.host!r} is invalid")

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = re.fullmatch(r"([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)(\+tls)?", text.strip())
        if not m:
            raise SettingsError(f"destination {text!r} is not of the form AE@host:port or AE@host:port+tls")
        return cls(m.group(1), m.group(2).strip("[]"), int(m.group(3)), tls=bool(m.group(4)))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}" + ("+tls" if self.tls else "")


@dataclasses.dataclass(frozen=True)
class RoutingRule:
    """Which stable series are analysed. Empty fields match anything.

    Parameters
    ----------
    modality:
        Required Modality (0008,0060) of the series.
    sop_class_uid:
        Required SOP Class UID of at least one instance.
    image_type:
        A value that ImageType (0008,0008) of that instance must contain.
    """

    modality: str = "SM"
    sop_class_uid: str = VL_WSM
    image_type: str = "VOLUME"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RoutingRule:
        unknown = set(raw) - {"modality", "sop_class_uid", "image_type"}
        if unknown:
            raise SettingsError(f"routing rule has unknown keys {sorted(unknown)}")
        return cls(**{k: str(v) for k, v in raw.items()})


@dataclasses.dataclass(frozen=True)
class Settings:
    """All settings of a node, validated on construction."""

    data_dir: Path = Path("var")
    ae_title: str = "CYTONODE"
    bind_address: str = "0.0.0.0"
    dicom_port: int = 11112
    http_port: int = 8080
    allowed_aes: tuple[str, ...] = ()
    require_called_ae: bool = True
    max_associations: int = 16
    max_pdu: int = 4 * 1024 * 1024
    network_timeout_s: float = 60.0
    destinations: tuple[Destination, ...] = ()
    stable_age_s: float = 10.0
    routing_rules: tuple[RoutingRule, ...] = (RoutingRule(),)
    duplicate_policy: DuplicatePolicyValues = DuplicatePolicyValues.KEEP
    database_url: str = ""
    broker_url: str = ""
    workers: int = 1
    device: DeviceValues = DeviceValues.AUTO
    release_policy: ReleasePolicyValues = ReleasePolicyValues.IMMEDIATE
    outbox_retry_initial_s: float = 2.0
    outbox_retry_max_s: float = 300.0
    #: A running job whose worker has not renewed its lease for this long is queued again.
    job_lease_s: float = 120.0
    #: Runs of one job (the first included) before a lost job is failed instead of requeued.
    job_max_attempts: int = 3
    shutdown_grace_s: float = 30.0
    min_free_bytes: int = 64 * 1024 * 1024
    #: The most bytes a Deflated Explicit VR Little Endian data set may inflate to (PS3.5 A.5).
    max_inflated_bytes: int = MAX_OBJECT_BYTES
    move_destinations: tuple[Destination, ...] = ()
    api_token: str = ""
    secret_key: str = ""
    http_enabled: bool = True
    site_calibration: str = ""
    tls_certificate: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_require_client_certificate: bool = False
    #: Folder with the classifier's weights and calibration; empty: the shipped ones.
    weights_dir: str = ""
    #: The classifier's timestep budget per class; 0: the calibrated one.
    classifier_timesteps: int = 0
    #: Whether jobs compute the counterfactual heatmaps (and write the SEG).
    heatmaps: bool = True
    institution_name: str = ""
    device_serial_number: str = "0"
    sr_series_number: int = 900
    ann_series_number: int = 901
    seg_series_number: int = 902

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "ae_title")
        for ae in self.allowed_aes:
            check_ae_title(ae, "allowed_aes")
        for name in ("dicom_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise SettingsError(f"{name} {port} is out of range 0-65535")
        if self.max_associations < 1:
            raise SettingsError("max_associations must be at least 1")
        if self.max_pdu != 0 and self.max_pdu < 4096:
            raise SettingsError("max_pdu must be 0 (unlimited) or at least 4096 bytes")
        if self.max_inflated_bytes < 1024 * 1024:
            raise SettingsError("max_inflated_bytes must be at least 1 MiB (1048576 bytes)")
        if self.stable_age_s < 0 or self.network_timeout_s <= 0 or self.shutdown_grace_s < 0:
            raise SettingsError("stable_age_s, network_timeout_s and shutdown_grace_s must be positive")
        if not 0 < self.outbox_retry_initial_s <= self.outbox_retry_max_s:
            raise SettingsError("need 0 < outbox_retry_initial_s <= outbox_retry_max_s")
        if self.job_lease_s <= 0 or self.job_max_attempts < 1:
            raise SettingsError("need job_lease_s > 0 and job_max_attempts >= 1")
        if self.workers < 0:
            raise SettingsError("workers must be 0 (no embedded worker) or more")
        for name, enum_type in (("duplicate_policy", DuplicatePolicyValues),
                                ("device", DeviceValues),
                                ("release_policy", ReleasePolicyValues)):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                allowed = ", ".join(v.value for v in enum_type)
                raise SettingsError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}") from None
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.site_calibration not in ("", "none"):
            from analysis.site import check_site_id

            try:
                check_site_id(self.site_calibration)
            except ValueError as exc:
                raise SettingsError(f"site_calibration: {exc}") from None
        if self.classifier_timesteps != 0 and self.classifier_timesteps < 2:
            raise SettingsError("classifier_timesteps must be 0 (the calibrated budget) or at least 2")
        if self.weights_dir and not Path(self.weights_dir).is_dir():
            raise SettingsError(f"weights_dir: {self.weights_dir!r} is not a folder")
        try:
            self.encoder.params()
        except ValueError as exc:
            raise SettingsError(f"encoder settings: {exc}") from None
        self._check_tls()

    # Typed sections ----------------------------------------------------
    # The flat fields above are the contract with the environment and the TOML file; each part of
    # the node takes the section it needs, typed, and nothing else.
    @property
    def network(self) -> NetworkSection:
        return _section(NetworkSection, self)

    @property
    def storage(self) -> StorageSection:
        return _section(StorageSection, self)

    @property
    def jobs(self) -> JobsSection:
        return _section(JobsSection, self)

    @property
    def analysis(self) -> AnalysisSection:
        return _section(AnalysisSection, self)

    @property
    def encoder(self) -> EncoderSection:
        return _section(EncoderSection, self)

    @property
    def web(self) -> WebSection:
        return _section(WebSection, self)

    def _check_tls(self) -> None:
        """TLS needs the certificate and its key together; required client certificates need
        the CAs that sign them. The files must exist (their contents are checked at start)."""
        if bool(self.tls_certificate) != bool(self.tls_key):
            raise SettingsError("tls_certificate and tls_key must be set together (PEM files): "
                                "both switch TLS on, neither leaves it off")
        if self.tls_require_client_certificate and not (self.tls_enabled and self.tls_ca):
            raise SettingsError("tls_require_client_certificate needs tls_certificate, tls_key and "
                                "tls_ca (the CAs that sign the client certificates)")
        for name in ("tls_certificate", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SettingsError(f"{name}: {path!r} is not a file")

    @property
    def tls_enabled(self) -> bool:
        """TLS on the DICOM port and HTTPS on the HTTP port (``tls_certificate`` is set)."""
        return bool(self.tls_certificate)

    def active_site(self) -> Any:
        """The site calibration jobs use: the one named by ``site_calibration``, else the
        newest in ``DATA_DIR/sites`` (``None`` with none there, or with ``none``).

        Raises
        ------
        SettingsError
            If the named calibration does not exist or cannot be read, or none is named and
            the newest calibration file is damaged (:func:`analysis.site.newest_site`).
        """
        from analysis.site import load_site, newest_site

        if self.site_calibration == "none":
            return None
        if self.site_calibration:
            try:
                return load_site(self.data_dir, self.site_calibration)
            except (OSError, ValueError, KeyError) as exc:
                raise SettingsError(f"site_calibration {self.site_calibration!r}: {exc}") from None
        try:
            return newest_site(self.data_dir)
        except (OSError, ValueError) as exc:
            raise SettingsError(str(exc)) from None

    # Derived locations -------------------------------------------------
    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def results_dir(self) -> Path:
        """Per-series analysis results (``<series uid>/summary.json``, ``heatmaps.npz``) for the viewer."""
        return self.data_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def redacted(self) -> dict[str, Any]:
        """The settings as plain values, with passwords in URLs masked, for logs."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Destination) else
                         dataclasses.asdict(v) if isinstance(v, RoutingRule) else v for v in value]
            if field.name in ("api_token", "secret_key") and value:
                value = "***"
            if isinstance(value, str) and "://" in value:
                value = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", value)
            out[field.name] = value
        out["effective_database_url"] = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@",
                                               self.effective_database_url)
        out["effective_broker_url"] = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@",
                                             self.effective_broker_url)
        return out

    # Construction --------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from ``CYTONODE_*`` variables and ``CYTONODE_CONFIG``.

        Raises
        ------
        SettingsError
            If a variable is unknown, malformed or out of range.
        """
        env = dict(os.environ if environ is None else environ)
        raw: dict[str, Any] = {}
        config = env.get(PREFIX + "CONFIG")
        if config:
            try:
                with open(config, "rb") as fh:
                    raw.update(tomllib.load(fh))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"CYTONODE_CONFIG {config}: {exc}") from exc
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in env.items():
            if not key.startswith(PREFIX) or key == PREFIX + "CONFIG":
                continue
            name = key[len(PREFIX):].lower()
            if name not in fields:
                raise SettingsError(f"unknown setting {key}")
            raw[name] = value
        unknown = set(raw) - set(fields)
        if unknown:
            raise SettingsError(f"unknown settings in {config}: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            kwargs[name] = _convert(name, value, fields[name].type)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class NetworkSection:
    """The DICOM side: who the node is, who may talk to it, where results go."""

    ae_title: str
    bind_address: str
    dicom_port: int
    allowed_aes: tuple[str, ...]
    require_called_ae: bool
    max_associations: int
    max_pdu: int
    network_timeout_s: float
    destinations: tuple[Destination, ...]
    move_destinations: tuple[Destination, ...]
    tls_certificate: str
    tls_key: str
    tls_ca: str
    tls_require_client_certificate: bool
    #: How long in-flight associations (and the worker's running task) may finish at shutdown.
    shutdown_grace_s: float


@dataclasses.dataclass(frozen=True)
class StorageSection:
    """The store: where files and the index live and what it accepts."""

    data_dir: Path
    database_url: str
    duplicate_policy: DuplicatePolicyValues
    min_free_bytes: int
    max_inflated_bytes: int


@dataclasses.dataclass(frozen=True)
class JobsSection:
    """Routing, the queue, the workers and when results leave the node."""

    stable_age_s: float
    routing_rules: tuple[RoutingRule, ...]
    broker_url: str
    workers: int
    job_lease_s: float
    job_max_attempts: int
    release_policy: ReleasePolicyValues
    outbox_retry_initial_s: float
    outbox_retry_max_s: float


@dataclasses.dataclass(frozen=True)
class AnalysisSection:
    """What a job runs: the weights, the device, the classifier's budget, the heatmaps and the
    site calibration (:meth:`Settings.active_site`)."""

    weights_dir: str
    device: DeviceValues
    classifier_timesteps: int
    heatmaps: bool
    site_calibration: str

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda``: ``auto`` picks CUDA when torch sees a GPU."""
        if self.device is not DeviceValues.AUTO:
            return self.device.value
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class EncoderSection:
    """Who writes the node's DICOM objects and how their series are numbered."""

    institution_name: str
    device_serial_number: str
    sr_series_number: int
    ann_series_number: int
    seg_series_number: int

    def params(self) -> Any:
        """The encoders' :class:`dicom_node.encode.common.EncoderParams`.

        Raises
        ------
        ValueError
            If a value is not valid in DICOM (e.g. two series numbers equal).
        """
        from dicom_node.encode.common import EncoderParams

        return EncoderParams(device_serial_number=self.device_serial_number,
                             institution_name=self.institution_name or None,
                             sr_series_number=self.sr_series_number,
                             ann_series_number=self.ann_series_number,
                             seg_series_number=self.seg_series_number)


@dataclasses.dataclass(frozen=True)
class WebSection:
    """The HTTP side: the viewer and DICOMweb."""

    http_enabled: bool
    http_port: int
    api_token: str
    secret_key: str


def _section(cls: Any, settings: Settings) -> Any:
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    if isinstance(value, list):
        return value
    raise SettingsError(f"expected a list, got {value!r}")


def _convert(name: str, value: Any, type_: Any) -> Any:
    text = str(type_)
    try:
        if name in ("destinations", "move_destinations"):
            return tuple(v if isinstance(v, Destination) else Destination.parse(str(v)) for v in _split(value))
        if name == "routing_rules":
            rules = json.loads(value) if isinstance(value, str) else value
            if not isinstance(rules, list):
                raise SettingsError("routing_rules must be a list of tables")
            return tuple(RoutingRule.from_mapping(r) for r in rules)
        if name == "allowed_aes":
            return tuple(str(v).strip() for v in _split(value))
        if text == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise SettingsError(f"{name}: {value!r} is not a boolean")
            return lowered in ("1", "true", "yes", "on")
        if text == "int":
            return int(value)
        if text == "float":
            return float(value)
        if text == "Path":
            return Path(str(value))
        return value
    except (ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"setting {name}: {exc}") from exc
