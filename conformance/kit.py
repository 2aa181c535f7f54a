"""The conformance kit: checks a running node over the network and reports pass/fail.

``python -m conformance --host H --port P --aet AE [--calling-aet AE] [--junit FILE]``

Checks, in order: C-ECHO; C-STORE of every (SOP class, transfer syntax) pair in
``contexts.json`` with real objects; C-FIND (study root and patient root; study, series, image
levels; wildcard, date range, UID list) of what was stored; C-MOVE to the kit (a configured
move destination) and to an unknown AE (refused); C-GET with SCP/SCU role selection; refusal of
an unknown calling AE; failure statuses for bad datasets; dciodvfy validation of the node's
own result objects (SR, ANN, SEG) retrieved by C-GET.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_role, evt

from conformance.objects import (
    KIT_PATIENT_ID,
    KIT_PATIENT_NAME,
    ObjectFactory,
    sample_slide_files,
)

VERIFICATION = "1.2.840.10008.1.1"
TABLE = json.loads((Path(__file__).with_name("contexts.json")).read_text())
STORAGE = TABLE["scp"]["storage"]
QR = TABLE["scp"]["query_retrieve"]["sop_classes"]
QR_STATUS = {k: int(v, 16) for k, v in TABLE["query_retrieve_statuses"].items()}
STORE_STATUS = {k: int(v, 16) for k, v in TABLE["c_store_statuses"].items()}
RESULT_MODALITIES = ("SR", "ANN", "SEG")
RESULT_MANUFACTURER = "CytoNode"
#: dciodvfy messages known to be wrong for the objects CytoNode writes (each explained in
#: conformance/README.md); every other "Error" fails the check.
DCIODVFY_FALSE_POSITIVES = (
    # PS3.3 C.7.6.1: Patient Orientation is Type 2C, not required when Image Orientation
    # (Slide) is present, which it is in every SEG we write.
    "Error - Missing attribute Type 2C Conditional Element=<PatientOrientation> "
    "Module=<GeneralImage>",
)


@dataclasses.dataclass
class Result:
    name: str
    passed: bool
    detail: str
    seconds: float


class CheckFailed(AssertionError):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Kit:
    """One run of the kit against one node."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: list[Result] = []
        self.factory: ObjectFactory | None = None
        #: SOP Instance UID -> (file sent, SOP class, transfer syntax) of stored kit objects
        self.stored: dict[str, tuple[Path, str, str]] = {}

    # Plumbing ------------------------------------------------------------------------------
    def check(self, name: str, func: Callable[[], str | None]) -> bool:
        start = time.monotonic()
        try:
            detail = func() or ""
            passed = True
        except CheckFailed as exc:
            passed, detail = False, str(exc)
        except Exception as exc:  # the kit's edge: report any failure as a failed check
            passed, detail = False, f"{type(exc).__name__}: {exc}"
            if self.args.verbose:
                traceback.print_exc()
        self.results.append(Result(name, passed, detail, time.monotonic() - start))
        mark = "PASS" if passed else "FAIL"
        print(f"  {mark}  {name}  {detail}"[:400], flush=True)
        return passed

    def ae(self, title: str | None = None) -> AE:
        ae = AE(ae_title=title or self.args.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.args.timeout
        return ae

    def associate(self, ae: AE, **kwargs: Any) -> Any:
        assoc = ae.associate(self.args.host, self.args.port, ae_title=self.args.aet, **kwargs)
        require(assoc.is_established,
                f"association {ae.ae_title} -> {self.args.aet}@{self.args.host}:{self.args.port} "
                "was not established (is the calling AE allowed?)")
        return assoc

    # Checks --------------------------------------------------------------------------------
    def echo(self) -> str:
        ae = self.ae()
        ae.add_requested_context(VERIFICATION)
        assoc = self.associate(ae)
        try:
            rsp = assoc.send_c_echo()
        finally:
            assoc.release()
        require(getattr(rsp, "Status", None) == 0, f"C-ECHO status {getattr(rsp, 'Status', None)}")
        return "status 0x0000"

    def store_all(self) -> None:
        """One association per transfer syntax, one context per SOP class, one object each."""
        self.factory = ObjectFactory()
        objects = self.workdir / "objects"
        objects.mkdir(exist_ok=True)
        for ts_name, ts in STORAGE["transfer_syntaxes"].items():
            files: dict[str, Path] = {}
            build_errors: dict[str, str] = {}
            for sc_name, sc in STORAGE["sop_classes"].items():
                try:
                    files[sc_name] = self.factory.make(sc, ts, objects)
                except Exception as exc:  # reported per pair below
                    build_errors[sc_name] = f"could not build the test object: {exc}"
            ae = self.ae()
            for sc in STORAGE["sop_classes"].values():
                ae.add_requested_context(sc, ts)
            assoc = None
            assoc_error = ""
            try:
                assoc = self.associate(ae)
            except CheckFailed as exc:
                assoc_error = str(exc)
            try:
                for sc_name, sc in STORAGE["sop_classes"].items():
                    def one(sc_name: str = sc_name, sc: str = sc) -> str:
                        require(sc_name not in build_errors, build_errors.get(sc_name, ""))
                        if assoc is None:
                            raise CheckFailed(assoc_error)
                        accepted = [cx for cx in assoc.accepted_contexts
                                    if cx.abstract_syntax == sc and ts in cx.transfer_syntax]
                        require(bool(accepted), "presentation context rejected")
                        path = files[sc_name]
                        rsp = assoc.send_c_store(path)
                        status = getattr(rsp, "Status", None)
                        require(status == 0, f"C-STORE status {status!r}")
                        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                        self.stored[uid] = (path, sc, ts)
                        return f"stored {uid[-12:]}"
                    self.check(f"store {sc_name} / {ts_name}", one)
            finally:
                if assoc is not None and assoc.is_established:
                    assoc.release()

    def _find(self, model: str, keys: dict[str, str]) -> list[Dataset]:
        ae = self.ae()
        ae.add_requested_context(QR[model])
        assoc = self.associate(ae)
        try:
            ds = Dataset()
            for k, v in keys.items():
                setattr(ds, k, v)
            out, final = [], None
            for status, identifier in assoc.send_c_find(ds, QR[model]):
                require(status is not None and "Status" in status, "no C-FIND response")
                if status.Status in (0xFF00, 0xFF01):
                    out.append(identifier)
                else:
                    final = int(status.Status)
        finally:
            assoc.release()
        require(final == 0, f"final C-FIND status 0x{final or 0:04X}")
        return out

    def find_checks(self) -> None:
        require_stored = bool(self.stored) and self.factory is not None
        study = self.factory.study_uid if self.factory else ""
        sm = "StudyRootQueryRetrieveInformationModelFind"
        pm = "PatientRootQueryRetrieveInformationModelFind"
        series_uids = {str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
                       for p, _, _ in self.stored.values()}

        def study_level() -> str:
            require(require_stored, "nothing was stored")
            got = self._find(sm, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study,
                                  "PatientID": "", "NumberOfStudyRelatedInstances": ""})
            require(len(got) == 1, f"{len(got)} matches for the kit study")
            n = int(got[0].NumberOfStudyRelatedInstances)
            require(n >= len(self.stored), f"NumberOfStudyRelatedInstances {n} < {len(self.stored)}")
            require(got[0].PatientID == KIT_PATIENT_ID, f"PatientID {got[0].PatientID!r}")
            return f"{n} instances in the kit study"

        def wildcard_and_range() -> str:
            got = self._find(sm, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                                  "PatientName": KIT_PATIENT_NAME[:-2] + "*",
                                  "StudyDate": "19000101-"})
            require(study in {str(d.StudyInstanceUID) for d in got},
                    "the kit study did not match PatientName wildcard + open date range")
            none = self._find(sm, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study,
                                   "StudyDate": "18000101-18001231"})
            require(not none, "a date range that excludes the study matched it")
            return f"{len(got)} studies match"

        def series_level() -> str:
            got = self._find(sm, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study,
                                  "SeriesInstanceUID": "", "Modality": ""})
            found = {str(d.SeriesInstanceUID) for d in got}
            require(series_uids <= found, f"{len(series_uids - found)} kit series not found")
            return f"{len(found)} series"

        def image_level_uid_list() -> str:
            uids = sorted(self.stored)[:3]
            got = self._find(sm, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study,
                                  "SeriesInstanceUID": "", "SOPInstanceUID": "\\".join(uids),
                                  "SOPClassUID": ""})
            require(sorted(str(d.SOPInstanceUID) for d in got) == uids,
                    "UID list matching returned other instances")
            return f"{len(got)} instances"

        def patient_root() -> str:
            got = self._find(pm, {"QueryRetrieveLevel": "PATIENT", "PatientID": KIT_PATIENT_ID,
                                  "PatientName": ""})
            require(len(got) == 1, f"{len(got)} patients match {KIT_PATIENT_ID}")
            studies = self._find(pm, {"QueryRetrieveLevel": "STUDY", "PatientID": KIT_PATIENT_ID,
                                      "StudyInstanceUID": study})
            require(len(studies) == 1, "the kit study was not found under its patient")
            return "patient and study found"

        def bad_level() -> str:
            ae = self.ae()
            ae.add_requested_context(QR[sm])
            assoc = self.associate(ae)
            try:
                ds = Dataset()
                with warnings.catch_warnings():  # the invalid value is the point of the check
                    warnings.simplefilter("ignore")
                    ds.QueryRetrieveLevel = "NOT-A-LEVEL"
                statuses = [int(s.Status) for s, _ in assoc.send_c_find(ds, QR[sm]) if s]
            finally:
                assoc.release()
            expected = QR_STATUS["IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS"]
            require(statuses == [expected], f"statuses {[hex(s) for s in statuses]}")
            return f"0x{expected:04X}"

        self.check("find study root STUDY level", study_level)
        self.check("find wildcard + date range", wildcard_and_range)
        self.check("find SERIES level", series_level)
        self.check("find IMAGE level, UID list", image_level_uid_list)
        self.check("find patient root PATIENT + STUDY levels", patient_root)
        self.check("find bad Query/Retrieve Level refused", bad_level)

    def _pick_series(self) -> tuple[str, set[str]]:
        """A kit series (the WSM one) and its stored SOP Instance UIDs."""
        by_series: dict[str, set[str]] = {}
        for uid, (path, sc, _ts) in self.stored.items():
            if sc == STORAGE["sop_classes"]["VLWholeSlideMicroscopyImageStorage"]:
                series = str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
                by_series.setdefault(series, set()).add(uid)
        require(bool(by_series), "no whole slide image was stored")
        series, uids = next(iter(by_series.items()))
        return series, uids

    def _compare(self, received: dict[str, Dataset], wanted: set[str]) -> None:
        require(set(received) == wanted,
                f"received {len(received)} of {len(wanted)} instances "
                f"({len(set(received) - wanted)} unexpected)")
        for uid in wanted:
            sent = dcmread(self.stored[uid][0])
            got = received[uid]
            require(bytes(got.PixelData) == bytes(sent.PixelData),
                    f"{uid}: pixel data differ from what was stored")

    def get(self) -> str:
        series, wanted = self._pick_series()
        received: dict[str, Dataset] = {}

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            received[str(ds.SOPInstanceUID)] = ds
            return 0

        ae = self.ae()
        model = QR["StudyRootQueryRetrieveInformationModelGet"]
        ae.add_requested_context(model)
        wsm = STORAGE["sop_classes"]["VLWholeSlideMicroscopyImageStorage"]
        for ts in STORAGE["transfer_syntaxes"].values():
            ae.add_requested_context(wsm, ts)
        roles = [build_role(wsm, scp_role=True)]
        assoc = self.associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = self.factory.study_uid if self.factory else ""
            ds.SeriesInstanceUID = series
            statuses = [int(s.Status) for s, _ in assoc.send_c_get(ds, model) if s]
        finally:
            assoc.release()
        require(statuses[-1:] == [0], f"final C-GET status {statuses[-1:]}")
        self._compare(received, wanted)
        return f"{len(received)} instances, every transfer syntax, pixel data identical"

    def move(self) -> str:
        series, wanted = self._pick_series()
        received: dict[str, Dataset] = {}

        def on_store(event: evt.Event) -> int:
            received[str(event.dataset.SOPInstanceUID)] = event.dataset
            return 0

        scp = self.ae(self.args.move_aet)
        wsm = STORAGE["sop_classes"]["VLWholeSlideMicroscopyImageStorage"]
        scp.add_supported_context(wsm, list(STORAGE["transfer_syntaxes"].values()))
        scp.add_supported_context(VERIFICATION)
        server = scp.start_server(("0.0.0.0", self.args.move_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert server is not None  # block=False returns the server
        try:
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = self.factory.study_uid if self.factory else ""
            ds.SeriesInstanceUID = series
            statuses = self._c_move(ds, self.args.move_aet)
        finally:
            server.shutdown()
        unknown = QR_STATUS["MOVE_DESTINATION_UNKNOWN"]
        require(statuses[-1:] != [unknown],
                f"the node does not know move destination {self.args.move_aet}; configure it "
                f"(CYTONODE_MOVE_DESTINATIONS={self.args.move_aet}@<this host>:{self.args.move_port})")
        require(statuses[-1:] == [0], f"final C-MOVE status {statuses[-1:]}")
        self._compare(received, wanted)
        return f"{len(received)} instances to {self.args.move_aet}"

    def _c_move(self, identifier: Dataset, destination: str) -> list[int]:
        """Every status of one study-root C-MOVE (pending ones included), in order."""
        ae = self.ae()
        model = QR["StudyRootQueryRetrieveInformationModelMove"]
        ae.add_requested_context(model)
        assoc = self.associate(ae)
        try:
            return [int(s.Status) for s, _ in assoc.send_c_move(identifier, destination, model) if s]
        finally:
            assoc.release()

    def move_unknown(self) -> str:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = self.factory.study_uid if self.factory else "1.2.3"
        statuses = self._c_move(ds, "NO-SUCH-AE-KIT")
        expected = QR_STATUS["MOVE_DESTINATION_UNKNOWN"]
        require(statuses == [expected], f"statuses {[hex(s) for s in statuses]}")
        return f"0x{expected:04X}"

    def unknown_ae(self) -> str:
        ae = self.ae(self.args.unknown_aet)
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate(self.args.host, self.args.port, ae_title=self.args.aet)
        if assoc.is_established:
            assoc.release()
            raise CheckFailed(f"calling AE {self.args.unknown_aet!r} was accepted; the node "
                              "accepts any calling AE (set CYTONODE_ALLOWED_AES)")
        require(assoc.is_rejected, "association neither accepted nor rejected (aborted?)")
        return f"rejected {self.args.unknown_aet!r}"

    def _send_raw(self, path: Path, sop_class: str) -> int | None:
        ae = self.ae()
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
        assoc = self.associate(ae)
        try:
            rsp = assoc.send_c_store(path)  # a path is sent as is (chunked send)
        finally:
            assoc.release()
        return getattr(rsp, "Status", None)

    def bad_datasets(self) -> None:
        template = next(p for p, sc, ts in self.stored.values()
                        if ts == "1.2.840.10008.1.2.1" and "PixelData" in dcmread(p, stop_before_pixels=False))
        src = dcmread(template)
        sc_claimed = STORAGE["sop_classes"]["SecondaryCaptureImageStorage"]

        def mismatch() -> str:
            ds = src.copy()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.MediaStorageSOPClassUID = sc_claimed  # the request's class
            ds.preamble = b"\0" * 128
            path = self.workdir / "mismatch.dcm"
            ds.save_as(path, enforce_file_format=False)  # keeps the meta as set
            status = self._send_raw(path, sc_claimed)
            expected = STORE_STATUS["SOP_CLASS_MISMATCH"]
            require(status == expected, f"status {status!r}, expected 0x{expected:04X}")
            return f"0x{expected:04X}"

        def undecodable() -> str:
            ds = src.copy()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = self.workdir / "truncated.dcm"
            ds.save_as(path, enforce_file_format=True)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # cut inside the pixel data
            status = self._send_raw(path, str(ds.SOPClassUID))
            require(status is not None and (status >> 12) in (0xA, 0xC),
                    f"status {status!r}: a truncated dataset was not refused")
            return f"0x{status:04X}"

        self.check("store SOP class mismatch refused", mismatch)
        self.check("store truncated dataset refused", undecodable)

    # Result objects ------------------------------------------------------------------------
    def _result_series(self) -> list[Dataset]:
        model = "StudyRootQueryRetrieveInformationModelFind"
        found = []
        for modality in RESULT_MODALITIES:
            for d in self._find(model, {"QueryRetrieveLevel": "SERIES", "Modality": modality,
                                        "StudyInstanceUID": "", "SeriesInstanceUID": "",
                                        "Manufacturer": ""}):
                if str(d.get("Manufacturer", "")) == RESULT_MANUFACTURER:
                    found.append(d)
        return found

    def _send_sample_slide(self) -> None:
        """Send the bundled sample slide (new UIDs) so that the node analyses it."""
        study, series = generate_uid(), generate_uid()
        out = self.workdir / "slide"
        out.mkdir(exist_ok=True)
        ae = self.ae()
        files = []
        for p in sample_slide_files():
            ds = dcmread(p)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID, ds.PatientName = KIT_PATIENT_ID, KIT_PATIENT_NAME
            path = out / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = self.associate(ae)
        try:
            for path in files:
                rsp = assoc.send_c_store(path)
                require(getattr(rsp, "Status", None) == 0, "the sample slide was not stored")
        finally:
            assoc.release()

    def result_objects(self) -> str:
        dciodvfy = shutil.which("dciodvfy")
        if dciodvfy is None:
            raise CheckFailed("dciodvfy (dicom3tools) is not installed")
        series = self._result_series()
        if not series and self.args.results_timeout > 0:
            print(f"  ....  no result objects yet: sending the sample slide and waiting up to "
                  f"{self.args.results_timeout:.0f} s for the analysis", flush=True)
            self._send_sample_slide()
            deadline = time.monotonic() + self.args.results_timeout
            while time.monotonic() < deadline:
                series = self._result_series()
                if {str(s.Modality) for s in series} >= set(RESULT_MODALITIES):
                    break
                time.sleep(10)
        require(bool(series), "the node stores no result objects (SR, ANN, SEG) to validate")
        modalities = {str(s.Modality) for s in series}
        require(modalities >= set(RESULT_MODALITIES),
                f"result objects of {sorted(set(RESULT_MODALITIES) - modalities)} missing")
        out = self.workdir / "results"
        out.mkdir(exist_ok=True)
        received: dict[str, Path] = {}

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = out / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            received[str(ds.SOPInstanceUID)] = path
            return 0

        ae = self.ae()
        model = QR["StudyRootQueryRetrieveInformationModelGet"]
        ae.add_requested_context(model)
        classes = [STORAGE["sop_classes"][n] for n in (
            "Comprehensive3DSRStorage", "ComprehensiveSRStorage", "EnhancedSRStorage",
            "MicroscopyBulkSimpleAnnotationsStorage", "SegmentationStorage",
            "LabelMapSegmentationStorage")]
        syntaxes = list(STORAGE["transfer_syntaxes"].values())
        for sc in classes:
            ae.add_requested_context(sc, syntaxes[:3])
            ae.add_requested_context(sc, syntaxes[3:])
        roles = [build_role(sc, scp_role=True) for sc in classes]
        assoc = self.associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            for s in series:
                ds = Dataset()
                ds.QueryRetrieveLevel = "SERIES"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = s.StudyInstanceUID, s.SeriesInstanceUID
                statuses = [int(x.Status) for x, _ in assoc.send_c_get(ds, model) if x]
                require(statuses[-1:] == [0], f"C-GET of {s.Modality} series: {statuses[-1:]}")
        finally:
            assoc.release()
        require(bool(received), "C-GET returned no result objects")
        errors: list[str] = []
        for uid, path in received.items():
            run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True,
                                 timeout=300, check=False)
            for line in (run.stdout + run.stderr).splitlines():
                if line.startswith("Error") and line.strip() not in DCIODVFY_FALSE_POSITIVES:
                    errors.append(f"{uid[-12:]}: {line.strip()}")
        require(not errors, f"{len(errors)} dciodvfy errors: " + "; ".join(errors[:5]))
        return f"{len(received)} objects ({', '.join(sorted(modalities))}), 0 dciodvfy errors"

    # Run -----------------------------------------------------------------------------------
    def run(self) -> list[Result]:
        print(f"CytoNode conformance kit: {self.args.calling_aet} -> "
              f"{self.args.aet}@{self.args.host}:{self.args.port}", flush=True)
        if not self.check("echo", self.echo):
            return self.results
        self.store_all()
        self.find_checks()
        self.check("get series (C-GET, role selection)", self.get)
        self.check(f"move series to {self.args.move_aet}", self.move)
        self.check("move to unknown AE refused", self.move_unknown)
        self.check("unknown calling AE refused", self.unknown_ae)
        if self.stored:
            self.bad_datasets()
        if not self.args.skip_results:
            self.check("node result objects pass dciodvfy", self.result_objects)
        return self.results


def print_table(results: list[Result]) -> None:
    width = max(len(r.name) for r in results)
    print()
    print(f"{'check':<{width}}  result  detail")
    print(f"{'-' * width}  ------  ------")
    for r in results:
        print(f"{r.name:<{width}}  {'pass' if r.passed else 'FAIL':<6}  {r.detail[:120]}")
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")


def write_junit(results: list[Result], path: Path, target: str) -> None:
    failed = sum(not r.passed for r in results)
    total = sum(r.seconds for r in results)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name="cytonode-conformance" tests="{len(results)}" '
             f'failures="{failed}" errors="0" time="{total:.3f}" hostname={quoteattr(target)}>']
    for r in results:
        lines.append(f'  <testcase classname="conformance" name={quoteattr(r.name)} '
                     f'time="{r.seconds:.3f}">')
        if not r.passed:
            lines.append(f'    <failure message={quoteattr(r.detail[:500])}>'
                         f'{escape(r.detail)}</failure>')
        elif r.detail:
            lines.append(f"    <system-out>{escape(r.detail)}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m conformance",
                                description="DICOM conformance checks against a running node.")
    p.add_argument("--host", required=True, help="the node's host name or address")
    p.add_argument("--port", required=True, type=int, help="the node's DICOM port")
    p.add_argument("--aet", required=True, help="the node's AE title (called AE)")
    p.add_argument("--calling-aet", default="KIT", help="the kit's AE title (default KIT); "
                   "it must be in the node's allowed AEs")
    p.add_argument("--move-aet", default=None,
                   help="AE title the node moves to (default: the calling AE); it must be a "
                        "configured move destination pointing at this machine and --move-port")
    p.add_argument("--move-port", type=int, default=11113,
                   help="port the kit listens on for C-MOVE sub-operations (default 11113)")
    p.add_argument("--unknown-aet", default="NOT-ALLOWED-KIT",
                   help="a calling AE title the node must refuse (default NOT-ALLOWED-KIT)")
    p.add_argument("--junit", type=Path, help="write JUnit XML to this file")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    p.add_argument("--results-timeout", type=float, default=1800.0,
                   help="when the node has no result objects yet, send the sample slide and "
                        "wait this long for its analysis (0: do not send; default 1800)")
    p.add_argument("--skip-results", action="store_true",
                   help="skip the dciodvfy validation of the node's result objects")
    p.add_argument("--keep", type=Path, help="keep the objects sent and received in this folder")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.move_aet = args.move_aet or args.calling_aet
    if not 0 < args.port < 65536 or not 0 < args.move_port < 65536:
        p.error("ports must be 1-65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The kit is its own program: it sends stored files as they are (chunked, no re-encoding).
    _config.STORE_SEND_CHUNKED_DATASET = True
    with tempfile.TemporaryDirectory(prefix="cytonode-kit-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = Kit(args, workdir).run()
    print_table(results)
    if args.junit:
        write_junit(results, args.junit, f"{args.aet}@{args.host}:{args.port}")
        print(f"JUnit XML written to {args.junit}")
    return 0 if results and all(r.passed for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
