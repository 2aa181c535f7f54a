"""DICOMweb (PS3.18) on the HTTP port: QIDO-RS, WADO-RS (instances, metadata, frames, rendered)
and STOW-RS, under ``/dicomweb``.

Access: ``Authorization: Bearer <api_token>`` for machines, or a logged-in viewer session
(``session["user_id"]``) for people. STOW-RS (POST) needs the token, or a session plus the
``X-CSRF-Token`` header equal to ``session["csrf_token"]``. Matching is shared with the C-FIND
SCP (:mod:`dicom_node.net.qr`); instances are served from the store's files, as stored unless the
client asks for another transfer syntax.
"""

from __future__ import annotations

import hmac
import io
import itertools
import json
import logging
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, abort, current_app, jsonify, request, session, url_for
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import UID
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from dicom_node.errors import InvalidInstanceError, SOPClassMismatchError, StoreFullError
from dicom_node.net.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicom_node.settings import Settings
from dicom_node.status import StowFailureReasonValues, StowWarningReasonValues
from dicom_node.store.files import Store
from dicom_node.store.index import Instance, Series
from dicom_node.store.matching import (
    QueryError,
    QueryLevelValues,
    find,
    first_instance,
    keyword_vr,
    response_identifier,
)

log = logging.getLogger(__name__)

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")

EXPLICIT_LE = "1.2.840.10008.1.2.1"
UNCOMPRESSED = {"1.2.840.10008.1.2", EXPLICIT_LE}
_UID_RE = re.compile(r"^[0-9.]{1,64}$")
#: PS3.18 Table 8.7.3-5: frame media types and the transfer syntaxes they carry (first: default).
FRAME_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70"),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                   "1.2.840.10008.1.2.4.203"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
}
#: Default return attributes of QIDO-RS per level (PS3.18, Search transaction).
QIDO_DEFAULTS: dict[QueryLevelValues, tuple[str, ...]] = {
    QueryLevelValues.STUDY: (
        "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances"),
    QueryLevelValues.SERIES: (
        "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances", "StudyInstanceUID"),
    QueryLevelValues.IMAGE: (
        "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber", "Rows",
        "Columns", "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID"),
}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_QIDO_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}


def _store() -> Store:
    return current_app.extensions["cytonode.store"]  # type: ignore[no-any-return]


def _settings() -> Settings:
    return current_app.extensions["cytonode.settings"]  # type: ignore[no-any-return]


# Access ----------------------------------------------------------------------------------------
def _bearer_ok() -> bool:
    token = _settings().api_token
    header = request.headers.get("Authorization", "")
    if not token or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


@bp.before_request
def check_access() -> None:
    """Bearer token or logged-in session; STOW-RS also needs the CSRF header with a session."""
    if _bearer_ok():
        return
    if not isinstance(session.get("user_id"), int):
        abort(401)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        expected = session.get("csrf_token")
        given = request.headers.get("X-CSRF-Token", "")
        if not isinstance(expected, str) or not expected or \
                not hmac.compare_digest(given.encode(), expected.encode()):
            abort(403, description="missing or wrong X-CSRF-Token")


@bp.errorhandler(HTTPException)
def json_error(exc: HTTPException) -> tuple[Response, int]:
    rsp = jsonify(error=exc.name, description=exc.description)
    if exc.code == 401:
        rsp.headers["WWW-Authenticate"] = 'Bearer realm="cytonode-dicomweb"'
    return rsp, exc.code or 500


def _check_uid(value: str) -> str:
    if not _UID_RE.match(value):
        abort(400, description="not a valid UID")
    return value


# QIDO-RS ---------------------------------------------------------------------------------------
def _keyword(name: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        kw = keyword_for_tag(int(name, 16))
    else:
        kw = name if tag_for_keyword(name) is not None else ""
    if not kw:
        abort(400, description=f"unknown attribute {name[:64]!r}")
    return kw


def _qido(level: QueryLevelValues, fixed: dict[str, str]) -> Response:
    keys: dict[str, str] = {}
    include: list[str] = []
    include_all = False
    for name, values in request.args.lists():
        if name == "includefield":
            for v in ",".join(values).split(","):
                if v == "all":
                    include_all = True
                elif v:
                    include.append(_keyword(v))
        elif name not in _QIDO_CONTROL:
            kw = _keyword(name)
            value = values[-1]
            if keyword_vr(kw) == "UI":
                value = value.replace(",", "\\")  # PS3.18 8.3.4.1: comma-separated UID list
            keys[kw] = value
    keys.update(fixed)
    try:
        limit = int(request.args["limit"]) if "limit" in request.args else None
        offset = int(request.args.get("offset", 0))
    except ValueError:
        abort(400, description="limit and offset must be integers")
    if (limit is not None and limit < 0) or offset < 0:
        abort(400, description="limit and offset must not be negative")
    try:
        matches = find(_store(), level, keys, limit=limit, offset=offset)
    except QueryError as exc:
        abort(400, description=str(exc))
    requested = list(dict.fromkeys([*QIDO_DEFAULTS[level], *keys, *include]))
    out = []
    for match in matches:
        wanted = list(requested)
        if include_all:
            inst = match.instance
            if inst is None:
                inst = first_instance(_store(), match)
            if inst is not None:
                header = dcmread(_store().path_of(inst), stop_before_pixels=True)
                wanted += [e.keyword for e in header if e.keyword and e.tag.group != 2
                           and e.VR not in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN")
                           and e.keyword not in wanted]
        ds = response_identifier(_store(), match, wanted, _settings().ae_title, level)
        del ds.QueryRetrieveLevel
        ds.RetrieveURL = _retrieve_url(match.study.study_instance_uid,
                                       match.series.series_instance_uid if match.series else None,
                                       match.instance.sop_instance_uid if match.instance else None)
        out.append(ds.to_json_dict())
    # CP-2473: a search without matches is 200 OK with an empty array.
    return Response(json.dumps(out), 200, mimetype="application/dicom+json")


def _retrieve_url(study: str, series: str | None = None, instance: str | None = None) -> str:
    if instance is not None and series is not None:
        return url_for("dicomweb.retrieve_instance", study=study, series=series, instance=instance,
                       _external=True)
    if series is not None:
        return url_for("dicomweb.retrieve_series", study=study, series=series, _external=True)
    return url_for("dicomweb.retrieve_study", study=study, _external=True)


@bp.get("/studies")
def search_studies() -> Response:
    return _qido(QueryLevelValues.STUDY, {})


@bp.get("/series")
def search_all_series() -> Response:
    return _qido(QueryLevelValues.SERIES, {})


@bp.get("/studies/<study>/series")
def search_series(study: str) -> Response:
    return _qido(QueryLevelValues.SERIES, {"StudyInstanceUID": _check_uid(study)})


@bp.get("/instances")
def search_all_instances() -> Response:
    return _qido(QueryLevelValues.IMAGE, {})


@bp.get("/studies/<study>/instances")
def search_study_instances(study: str) -> Response:
    return _qido(QueryLevelValues.IMAGE, {"StudyInstanceUID": _check_uid(study)})


@bp.get("/studies/<study>/series/<series>/instances")
def search_instances(study: str, series: str) -> Response:
    return _qido(QueryLevelValues.IMAGE, {"StudyInstanceUID": _check_uid(study),
                                          "SeriesInstanceUID": _check_uid(series)})


# WADO-RS ---------------------------------------------------------------------------------------
def _instances(study: str, series: str | None = None, instance: str | None = None) -> list[Instance]:
    _check_uid(study)
    with _store().session() as s:
        stmt = select(Instance).join(Series).where(Series.study_instance_uid == study)
        if series is not None:
            stmt = stmt.where(Instance.series_instance_uid == _check_uid(series))
        if instance is not None:
            stmt = stmt.where(Instance.sop_instance_uid == _check_uid(instance))
        found = list(s.scalars(stmt.order_by(Instance.series_instance_uid,
                                            Instance.instance_number, Instance.sop_instance_uid)))
    if not found:
        abort(404)
    return found


def _accept() -> list[tuple[str, dict[str, str]]]:
    """Accept header entries as (media type, parameters), in the client's order."""
    out = []
    for item in request.headers.get("Accept", "").split(","):
        parts = [p.strip() for p in item.split(";") if p.strip()]
        if not parts:
            continue
        params = {}
        for p in parts[1:]:
            if "=" in p:
                k, v = p.split("=", 1)
                params[k.strip().lower()] = v.strip().strip('"')
        out.append((parts[0].lower(), params))
    return out


def _multipart(parts: Iterator[tuple[str, bytes]], part_type: str) -> Response:
    boundary = secrets.token_hex(16)

    def body() -> Iterator[bytes]:
        for content_type, data in parts:
            yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode()
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    mimetype = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return Response(body(), 200, content_type=mimetype)


def _instance_syntax() -> str:
    """The transfer syntax a WADO-RS instance retrieve asks for ("*": as stored)."""
    accept = _accept() or [("multipart/related", {"type": "application/dicom"})]
    for media, params in accept:
        inner = params.get("type", "application/dicom") if media == "multipart/related" else media
        if inner in ("application/dicom", "*/*", "*") or media == "*/*":
            return params.get("transfer-syntax", EXPLICIT_LE)
    abort(406)


def _instance_bytes(store: Store, inst: Instance, syntax: str) -> tuple[str, bytes]:
    path = store.path_of(inst)
    if syntax == "*" or syntax == inst.transfer_syntax_uid:
        return inst.transfer_syntax_uid, path.read_bytes()
    if syntax != EXPLICIT_LE:
        abort(406, description=f"transcoding to {syntax} is not supported")
    ds = dcmread(path)
    if inst.transfer_syntax_uid not in UNCOMPRESSED:
        try:
            ds.decompress()
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            log.warning("cannot decompress %s: %s", inst.sop_instance_uid, exc)
            abort(406, description="cannot decompress this instance; ask for transfer-syntax=*")
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return EXPLICIT_LE, buf.getvalue()


def _retrieve(instances: list[Instance]) -> Response:
    syntax = _instance_syntax()
    store = _store()

    def parts() -> Iterator[tuple[str, bytes]]:
        for inst in instances:
            ts, data = _instance_bytes(store, inst, syntax)
            yield f"application/dicom; transfer-syntax={ts}", data

    first = list(parts()) if len(instances) == 1 else None  # 406 before the stream starts
    return _multipart(iter(first) if first is not None else parts(), "application/dicom")


@bp.get("/studies/<study>")
def retrieve_study(study: str) -> Response:
    return _retrieve(_instances(study))


@bp.get("/studies/<study>/series/<series>")
def retrieve_series(study: str, series: str) -> Response:
    return _retrieve(_instances(study, series))


@bp.get("/studies/<study>/series/<series>/instances/<instance>")
def retrieve_instance(study: str, series: str, instance: str) -> Response:
    return _retrieve(_instances(study, series, instance))


def _metadata(instances: list[Instance]) -> Response:
    store = _store()
    out = []
    for inst in instances:
        ds = dcmread(store.path_of(inst), stop_before_pixels=True)
        series = inst.series_instance_uid
        study = str(ds.StudyInstanceUID)
        url = _retrieve_url(study, series, inst.sop_instance_uid)
        # Nested binary values (annotation coordinates, ICC profiles) are inlined, because the
        # bulkdata resource serves top-level elements only; large top-level ones become URIs.
        item = ds.to_json_dict(bulk_data_threshold=1 << 62)
        for elem in ds:
            if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > 1 << 20:
                item[f"{int(elem.tag):08X}"] = {
                    "vr": elem.VR, "BulkDataURI": f"{url}/bulkdata/{int(elem.tag):08X}"}
        if _has_pixels(inst):  # the frames resource serves the pixel data
            frames = ",".join(str(i) for i in range(1, inst.number_of_frames + 1))
            vr = "OW" if inst.transfer_syntax_uid in UNCOMPRESSED else "OB"
            item["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/frames/{frames}"}
        out.append(item)
    return Response(json.dumps(out), 200, mimetype="application/dicom+json")


def _has_pixels(inst: Instance) -> bool:
    return inst.sop_class_uid not in (
        STORAGE_SOP_CLASSES["MicroscopyBulkSimpleAnnotationsStorage"],
        STORAGE_SOP_CLASSES["BasicTextSRStorage"], STORAGE_SOP_CLASSES["EnhancedSRStorage"],
        STORAGE_SOP_CLASSES["ComprehensiveSRStorage"],
        STORAGE_SOP_CLASSES["Comprehensive3DSRStorage"])


@bp.get("/studies/<study>/metadata")
def study_metadata(study: str) -> Response:
    return _metadata(_instances(study))


@bp.get("/studies/<study>/series/<series>/metadata")
def series_metadata(study: str, series: str) -> Response:
    return _metadata(_instances(study, series))


@bp.get("/studies/<study>/series/<series>/instances/<instance>/metadata")
def instance_metadata(study: str, series: str, instance: str) -> Response:
    return _metadata(_instances(study, series, instance))


@bp.get("/studies/<study>/series/<series>/instances/<instance>/bulkdata/<tag>")
def bulkdata(study: str, series: str, instance: str, tag: str) -> Response:
    """A top-level bulk data element's value (those the metadata gave a BulkDataURI)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        abort(400)
    inst = _instances(study, series, instance)[0]
    ds = dcmread(_store().path_of(inst), stop_before_pixels=int(tag, 16) != 0x7FE00010)
    elem = ds.get(int(tag, 16))
    if elem is None or not isinstance(elem.value, (bytes, bytearray)):
        abort(404)
    return _multipart(iter([("application/octet-stream", bytes(elem.value))]),
                      "application/octet-stream")


def _frame_numbers(frames: str, inst: Instance) -> list[int]:
    """The frame list of a frames request: each of the instance's frames at most once, so a
    request is bounded by the instance itself (``frames/1,1,1,...`` would be unbounded)."""
    limit = inst.number_of_frames
    if frames.count(",") >= limit:
        abort(400, description=f"at most {limit} frame numbers per request (the instance's "
                               f"{limit} frames, each at most once)")
    try:
        numbers = [int(f) for f in frames.split(",")]
    except ValueError:
        abort(400, description="frame numbers must be integers")
    if len(set(numbers)) != len(numbers):
        abort(400, description=f"each frame may be asked for once per request (at most {limit} "
                               "frame numbers)")
    if not numbers or any(n < 1 or n > limit for n in numbers):
        abort(404, description=f"the instance has {limit} frames")
    return numbers


def _raw_frames(ds: Dataset, inst: Instance, numbers: list[int]) -> Iterator[bytes]:
    """The bytes as stored of frames ``numbers`` (encapsulated fragments joined, or native
    slices): no copy of the whole Pixel Data, only of the frames asked for."""
    if inst.transfer_syntax_uid in UNCOMPRESSED or inst.transfer_syntax_uid.endswith(".99"):
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        size = rows * cols * spp * bits // 8 if bits >= 8 else (rows * cols + 7) // 8
        data = memoryview(ds.PixelData)
        for n in numbers:
            yield bytes(data[(n - 1) * size:n * size])
        return
    asked, wanted = set(numbers), {}  # only the frames asked for, read up to the last of them
    frames = generate_fragmented_frames(ds.PixelData, number_of_frames=inst.number_of_frames)
    for n, fragments in enumerate(itertools.islice(frames, max(numbers)), 1):
        if n in asked:
            wanted[n] = b"".join(fragments)
    for n in numbers:
        yield wanted[n]


def _frame_choice(inst: Instance) -> tuple[str, str]:
    """(media type, transfer syntax) for a frames request; "" syntax means decode to native."""
    stored = inst.transfer_syntax_uid
    accept = _accept() or [("multipart/related", {"type": "application/octet-stream"})]
    for media, params in accept:
        inner = params.get("type", "application/octet-stream") if media == "multipart/related" \
            else media
        wanted = params.get("transfer-syntax")
        if inner in ("application/octet-stream", "*/*", "*"):
            if wanted == "*" or (wanted == stored and stored not in UNCOMPRESSED):
                return "application/octet-stream", stored
            if wanted in (None, EXPLICIT_LE):
                return "application/octet-stream", ""
        elif inner in FRAME_MEDIA_TYPES:
            allowed = FRAME_MEDIA_TYPES[inner]
            if stored in allowed and wanted in (None, "*", stored):
                return inner, stored
    abort(406, description=f"frames are stored as {stored}; ask for that or uncompressed")


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<frames>")
def retrieve_frames(study: str, series: str, instance: str, frames: str) -> Response:
    inst = _instances(study, series, instance)[0]
    if not _has_pixels(inst):
        abort(404, description="the instance has no pixel data")
    numbers = _frame_numbers(frames, inst)
    media, syntax = _frame_choice(inst)
    ds = dcmread(_store().path_of(inst))
    if "PixelData" not in ds:
        abort(404, description="the instance has no pixel data")
    # Parts are made as the response is sent, one frame in memory at a time.
    parts: Iterator[tuple[str, bytes]]
    if syntax:
        parts = ((f"{media}; transfer-syntax={syntax}", raw)
                 for raw in _raw_frames(ds, inst, numbers))
    elif inst.transfer_syntax_uid in UNCOMPRESSED:
        parts = (("application/octet-stream; transfer-syntax=" + EXPLICIT_LE, raw)
                 for raw in _raw_frames(ds, inst, numbers))
    else:
        from pydicom.pixels.utils import pixel_array

        def decoded() -> Iterator[tuple[str, bytes]]:
            for n in numbers:
                arr = pixel_array(ds, index=n - 1)  # YBR converted to RGB, as decompress() does
                yield ("application/octet-stream; transfer-syntax=" + EXPLICIT_LE,
                       np.ascontiguousarray(arr).tobytes())
        parts = decoded()
    return _multipart(parts, media)


def _rendered(inst: Instance, frame: int) -> Response:
    if not _has_pixels(inst):
        abort(406, description="the instance has no pixel data to render")
    from pydicom.pixels.utils import pixel_array

    ds = dcmread(_store().path_of(inst))
    if frame < 1 or frame > inst.number_of_frames or "PixelData" not in ds:
        abort(404)
    arr = pixel_array(ds, index=frame - 1)  # RGB for colour, YBR converted
    if arr.ndim == 2:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0).astype(np.uint8)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = 255 - arr
    image = Image.fromarray(arr.astype(np.uint8))
    media = "image/jpeg"
    for m, _ in _accept():
        if m in ("image/png", "image/jpeg"):
            media = m
            break
    buf = io.BytesIO()
    if media == "image/png":
        image.save(buf, format="PNG")
    else:
        quality = request.args.get("quality", "90")
        image.convert("RGB" if image.mode != "L" else "L").save(
            buf, format="JPEG", quality=max(1, min(100, int(quality) if quality.isdigit() else 90)))
    return Response(buf.getvalue(), 200, mimetype=media)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/rendered")
def rendered_instance(study: str, series: str, instance: str) -> Response:
    return _rendered(_instances(study, series, instance)[0], 1)


@bp.get("/studies/<study>/series/<series>/instances/<instance>/frames/<int:frame>/rendered")
def rendered_frame(study: str, series: str, instance: str, frame: int) -> Response:
    return _rendered(_instances(study, series, instance)[0], frame)


# STOW-RS ---------------------------------------------------------------------------------------
def _parts(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        abort(400, description="multipart boundary missing")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            abort(400, description="malformed multipart part")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, data[:-2] if data.endswith(b"\r\n") else data))
    return parts


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _stow_one(store: Store, data: bytes, study: str | None) -> tuple[Dataset, int | None]:
    """Store one Part 10 instance; returns its reference item and the failure reason (or None)."""
    with tempfile.NamedTemporaryFile(dir=store.tmp, suffix=".dcm", delete=False) as out:
        out.write(data)
        name = out.name
    try:
        try:
            checked = store.check_file(Path(name))  # before pydicom inflates or recurses into it
            head = dcmread(name, stop_before_pixels=True)
            sop_class = str(head.get("SOPClassUID", ""))
            sop_uid = str(head.get("SOPInstanceUID", ""))
            syntax = str(head.file_meta.get("TransferSyntaxUID", ""))
        except Exception:  # the HTTP edge: any undecodable part
            return _reference("", ""), int(StowFailureReasonValues.CANNOT_UNDERSTAND)
        ref = _reference(sop_class, sop_uid)
        if sop_class not in STORAGE_SOP_CLASSES.values():
            return ref, int(StowFailureReasonValues.SOP_CLASS_NOT_SUPPORTED)
        if syntax not in TRANSFER_SYNTAXES.values():
            return ref, int(StowFailureReasonValues.TRANSFER_SYNTAX_NOT_SUPPORTED)
        if study is not None and str(head.get("StudyInstanceUID", "")) != study:
            return ref, int(StowFailureReasonValues.STUDY_UID_MISMATCH)
        try:
            store.check_space()
            result = store.ingest_file(Path(name), calling_ae="STOW-RS", move=True, checked=checked)
        except StoreFullError:
            return ref, int(StowFailureReasonValues.OUT_OF_RESOURCES)
        except SOPClassMismatchError:
            return ref, int(StowFailureReasonValues.SOP_CLASS_MISMATCH)
        except InvalidInstanceError as exc:
            log.warning("STOW-RS refused %s: %s", sop_uid, exc)
            return ref, int(StowFailureReasonValues.CANNOT_UNDERSTAND)
        except Exception:  # the HTTP edge
            log.exception("STOW-RS failed to store %s", sop_uid)
            return ref, int(StowFailureReasonValues.PROCESSING_FAILURE)
        ref.RetrieveURL = _retrieve_url(str(head.StudyInstanceUID), result.series_instance_uid,
                                        sop_uid)
        if result.outcome == "kept":
            # a different instance with this UID was kept
            ref.WarningReason = int(StowWarningReasonValues.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
        return ref, None
    finally:
        Path(name).unlink(missing_ok=True)


def _stow(study: str | None) -> Response:
    content_type = request.headers.get("Content-Type", "")
    if not content_type.lower().startswith("multipart/related"):
        abort(415, description='send multipart/related; type="application/dicom"')
    m = re.search(r'type="?([^";]+)"?', content_type)
    if m and m.group(1).lower() != "application/dicom":
        abort(415, description="only application/dicom parts are accepted")
    store = _store()
    stored, failed = [], []
    for headers, data in _parts(request.get_data(cache=False), content_type):
        part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if part_type != "application/dicom":
            failed.append(_reference("", ""))
            failed[-1].FailureReason = int(StowFailureReasonValues.SOP_CLASS_NOT_SUPPORTED)
            continue
        ref, reason = _stow_one(store, data, study)
        if reason is None:
            stored.append(ref)
        else:
            ref.FailureReason = reason
            failed.append(ref)
    if not stored and not failed:
        abort(400, description="no instances in the request")
    rsp = Dataset()
    if study is not None:
        rsp.RetrieveURL = _retrieve_url(study)
    if stored:
        rsp.ReferencedSOPSequence = stored
    if failed:
        rsp.FailedSOPSequence = failed
    # PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored.
    code = 200 if not failed else 202 if stored else 409
    return Response(json.dumps(rsp.to_json_dict()), code, mimetype="application/dicom+json")


@bp.post("/studies")
def store_instances() -> Response:
    return _stow(None)


@bp.post("/studies/<study>")
def store_study_instances(study: str) -> Response:
    return _stow(_check_uid(study))
