"""``cytonode demo``: a node on free local ports receives the bundled sample slide.

Starts a node (SCP, router, outbox, embedded Celery worker, viewer) with a fresh data
directory and a stand-in PACS: Orthanc when it is installed (the slide is uploaded to
it and Orthanc routes it to the node by C-STORE, as a hospital PACS would), else a
pynetdicom storage SCP (the slide is sent by our own C-STORE SCU). It waits for the
analysis job, prints the differential and the flagged cells, and waits until the
results reached the stand-in PACS. With ``--exit`` it stops afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE

from dicom_node.app.node import Node
from dicom_node.encode.differential import Differential, cell_reason_labels, class_label
from dicom_node.settings import Destination, Settings
from dicom_node.status import StatusValues
from dicom_node.store.overview import node_status
from dicom_node.store.states import JobStateValues

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "data" / "sample_slide"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def send_files(files: list[Path], port: int, ae_title: str) -> None:
    """C-STORE each file to the node, checking every status."""
    ae = AE(ae_title="DEMOPACS")
    for path in files:
        meta = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        for i, path in enumerate(files, 1):
            rsp = assoc.send_c_store(dcmread(path))
            status = getattr(rsp, "Status", None)
            if status != StatusValues.SUCCESS:
                raise RuntimeError(f"C-STORE of {path.name} failed with status {status}")
            _say(f"  sent {i}/{len(files)}: {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    finally:
        assoc.release()


class StandInPACS:
    """A minimal storage SCP (pynetdicom) that keeps what the node sends it, for the demo."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import evt

        from dicom_node.net.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

        self.folder = folder
        self.received: list[tuple[str, str]] = []  # (modality, SOP Instance UID)
        self.ae = AE(ae_title="DEMOPACS")
        for uid in STORAGE_SOP_CLASSES.values():
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAXES.values()))
        self.port = _free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._handle_store)])

    def _handle_store(self, event: Any) -> int:
        ds = event.dataset  # read from the chunked-receive file
        uid = str(ds.SOPInstanceUID)
        if not UID(uid).is_valid:
            return int(StatusValues.INVALID_UIDS)
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{uid}.dcm", enforce_file_format=True)
        self.received.append((str(ds.get("Modality", "")), uid))
        return int(StatusValues.SUCCESS)

    def describe(self) -> str:
        return f"a pynetdicom storage SCP on 127.0.0.1:{self.port}"

    def send_slide(self, files: list[Path], port: int, ae_title: str) -> None:
        send_files(files, port, ae_title)

    def received_modalities(self) -> list[tuple[str, str]]:
        return list(self.received)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


class OrthancPACS:
    """Orthanc (when installed) as the stand-in PACS: it routes the slide to the node by
    C-STORE through its REST API and receives the results; its DICOMweb plugin serves them."""

    def __init__(self, folder: Path, binary: str, node_ae: str, node_port: int) -> None:
        self.folder = folder
        self.port, self.http_port = _free_port(), _free_port()
        plugins = [str(ORTHANC_PLUGINS / name) for name in ("libOrthancDicomWeb.so",)
                   if (ORTHANC_PLUGINS / name).exists()]
        config = {
            "Name": "cytonode-demo-pacs", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "HttpPort": self.http_port,
            "DicomPort": self.port, "DicomAet": "DEMOPACS", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "StableAge": 1,
            "DicomModalities": {"cytonode": [node_ae, "127.0.0.1", node_port]},
            "DicomScuTimeout": 60, "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = open(folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {folder}/orthanc.log")
            try:
                self._rest("GET", "/system")
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {folder}/orthanc.log") from None
                time.sleep(0.2)
        self.sent: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def describe(self) -> str:
        return (f"Orthanc on 127.0.0.1:{self.port} (web UI {self.url}/app/explorer.html, "
                f"DICOMweb {self.url}/dicom-web/)")

    def _rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=600) as rsp:
            return json.loads(rsp.read() or b"null")

    def send_slide(self, files: list[Path], port: int, ae_title: str) -> None:
        """Upload the slide into Orthanc, then let Orthanc C-STORE its series to the node."""
        series: set[str] = set()
        for i, path in enumerate(files, 1):
            answer = self._rest("POST", "/instances", path.read_bytes())
            series.add(answer["ParentSeries"])
            self.sent.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            _say(f"  uploaded {i}/{len(files)} to Orthanc: {path.name} "
                 f"({path.stat().st_size / 1e6:.1f} MB)")
        for orthanc_id in sorted(series):
            body = json.dumps({"Resources": [orthanc_id], "Synchronous": True}).encode()
            self._rest("POST", "/modalities/cytonode/store", body)
        _say(f"  Orthanc sent the series to {ae_title} by C-STORE")

    def received_modalities(self) -> list[tuple[str, str]]:
        out = []
        for orthanc_id in self._rest("GET", "/instances"):
            tags = self._rest("GET", f"/instances/{orthanc_id}/simplified-tags")
            uid = tags.get("SOPInstanceUID", "")
            if uid not in self.sent:
                out.append((tags.get("Modality", ""), uid))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _start_pacs(folder: Path, node_ae: str, node_port: int, kind: str) -> StandInPACS | OrthancPACS:
    binary = shutil.which("Orthanc")
    if kind == "orthanc" or (kind == "auto" and binary):
        if not binary:
            raise RuntimeError("--pacs orthanc: Orthanc is not installed (apt-get install orthanc)")
        return OrthancPACS(folder, binary, node_ae, node_port)
    return StandInPACS(folder)


def _load_summary(results_dir: Path) -> dict[str, Any] | None:
    """The job's ``summary.json``, read through the typed hand-over; ``None`` if unreadable."""
    from dicom_node.jobs.result import read_summary

    try:
        return read_summary(results_dir).as_dict()
    except (OSError, ValueError):  # ResultSchemaError is a ValueError
        return None


def _show_domain(summary: dict[str, Any]) -> None:
    """The slide quality check and the site calibration the review thresholds came from."""
    from analysis.domain import headline

    params = summary.get("provenance", {}).get("parameters", {})
    line = headline(params)
    if line is not None:
        _say(line)
    site = params.get("site_calibration", "none")
    _say(f"site calibration: {site}" + (" (the shipped thresholds; a lab calibrates its own with "
                                        "`cytonode calibrate-site`, see the README)"
                                        if site == "none" else ""))
    if params.get("site_calibration_warning"):
        _say(f"site calibration warning: {params['site_calibration_warning']}")


def _show_differential(summary: dict[str, Any]) -> None:
    """The differential as the SR and the viewer state it (white cells only, NRBC per 100 white
    cells, platelets apart, the caution under 100 white cells, the flag count)."""
    for line in Differential.from_summary(summary).lines():
        _say(line)


def _show_flagged(summary: dict[str, Any], limit: int = 15) -> None:
    """Every cell flagged for review, numbered as in the SR and the viewer, its reasons in words."""
    flagged = [c for c in summary.get("cells", []) if c.get("review")]
    if not flagged:
        _say("flagged cells: none")
        return
    _say(f"flagged cells: {Differential.from_summary(summary).flag_text} "
         f"(position in base-level pixels):")
    for cell in flagged[:limit]:
        reasons = cell_reason_labels(cell)
        _say(f"  Cell {cell['cell_id']:<4d} at ({cell['x']:.0f}, {cell['y']:.0f})  "
             f"{class_label(cell['label']):21s} p={cell['probability']:.2f}  "
             f"uncertainty={cell['uncertainty']:.2f}  anomaly={cell['anomaly_score']:.2f}  "
             f"{', '.join(reasons)}")
    if len(flagged) > limit:
        _say(f"  ... and {len(flagged) - limit} more (all of them in the viewer)")


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT end the demo cleanly: the node, its worker and the stand-in PACS stop."""
    import signal

    def on_signal(signum: int, _frame: Any) -> None:
        _say(f"received {signal.Signals(signum).name}; stopping")
        raise KeyboardInterrupt  # unwinds whatever the demo is doing into its clean shutdown

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _log_to_file(path: Path) -> None:
    """Send the node's log to ``path``; the terminal keeps warnings and the demo's own lines."""
    import logging

    # The file-system broker has no host; kombu says so on every connection.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setLevel(logging.WARNING)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def _demo_account(node: Node) -> tuple[str, str]:
    """A pathologist account with a fresh random password in the demo's throw-away index."""
    import secrets

    from viewer.auth import add_user  # the demo composes the whole product, viewer included

    password = secrets.token_urlsafe(9)  # the viewer's tables exist: node.start() built its app
    add_user(node.store, "pathologist", "pathologist", password, organization="CytoNode demo",
             person_name="Demo^Pathologist")
    return "pathologist", password


def run_demo(args: argparse.Namespace) -> int:
    files = sorted(SAMPLE_SLIDE.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no sample slide in {SAMPLE_SLIDE}")
    data_dir = Path(tempfile.mkdtemp(prefix="cytonode-demo-"))
    (data_dir / "pacs").mkdir()
    node_port, http_port = _free_port(), _free_port()
    pacs = _start_pacs(data_dir / "pacs", "CYTONODE", node_port, args.pacs)
    node: Node | None = None
    try:
        _stop_on_signals()
        settings = Settings(data_dir=data_dir / "node", bind_address="127.0.0.1", dicom_port=node_port,
                            http_port=http_port, stable_age_s=2.0, workers=1,
                            outbox_retry_initial_s=0.5,
                            destinations=(Destination("DEMOPACS", "127.0.0.1", pacs.port),))
        log_path = data_dir / "node.log"
        if not getattr(args, "verbose", False):
            _log_to_file(log_path)
        node = Node(settings, worker_log=None if getattr(args, "verbose", False) else log_path)
        node.start()
        account = _demo_account(node)
        _say(f"stand-in PACS DEMOPACS: {pacs.describe()}")
        _say(f"CytoNode demo: node {settings.ae_title} on 127.0.0.1:{settings.dicom_port}, "
             f"viewer on http://127.0.0.1:{http_port}/, data in {data_dir}")
        if not getattr(args, "verbose", False):
            _say(f"the node's log: {log_path} (cytonode -v demo shows it here)")
        _say(f"sending the sample slide ({len(files)} instances) by C-STORE ...")
        pacs.send_slide(files, settings.dicom_port, settings.ae_title)
        _say(f"waiting for the series to be stable ({settings.stable_age_s:.0f} s) and analysed ...")
        deadline = time.monotonic() + args.timeout
        job: dict[str, Any] | None = None
        shown = ""
        while time.monotonic() < deadline:
            jobs = node_status(node.store)["jobs"]
            job = jobs[0] if jobs else None
            if job and job["state"] in (JobStateValues.DONE, JobStateValues.FAILED):
                break
            line = (f"{job['state']}: {job['progress']}" if job and job.get("progress")
                    else str(job["state"]) if job else "waiting for the series")
            if line != shown:
                _say(f"  job {line}")
                shown = line
            time.sleep(1.0)
        if not job or job["state"] != JobStateValues.DONE:
            raise RuntimeError(f"the analysis job did not finish: {job}")
        result = job["result"]
        assert isinstance(result, dict)
        _say("slide received and opened:")
        _say(f"  {result['width']} x {result['height']} px at "
             f"{result['pixel_spacing_um'][0]:.3f} um/px, {len(result['levels'])} levels, "
             f"{result['frames']} frames in {result['instances']} instances")
        summary = _load_summary(Path(result["results_dir"])) if result.get("results_dir") else None
        _say(f"cells classified: {result['cell_count']}")
        if summary is not None:
            _show_domain(summary)
            _show_differential(summary)
            _show_flagged(summary)
        _say("results stored: " + ", ".join(sorted(result["objects"])))
        _say("sending the results to the stand-in PACS ...")
        received: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            received = pacs.received_modalities()
            if len(received) >= len(result["objects"]):
                break
            time.sleep(0.5)
        if len(received) < len(result["objects"]):
            raise RuntimeError(f"the stand-in PACS got {len(received)} of "
                               f"{len(result['objects'])} results: {node_status(node.store)['outbox']}")
        for modality, uid in sorted(received):
            _say(f"  DEMOPACS received {modality}: {uid}")
        _say(f"review and sign off in the viewer: http://127.0.0.1:{http_port}/ "
             f"(user {account[0]}, password {account[1]})")
        if not args.exit:
            _say(f"the node keeps running; send more with: storescu -R -xy -aec {settings.ae_title} "
                 f"127.0.0.1 {settings.dicom_port} FILES  (Ctrl-C stops)")
            node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
    return 0

