"""DICOMweb on a running node: QIDO-RS and WADO-RS answers checked against the stored files,
STOW-RS through the same store path as C-STORE, and access control."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import generate_uid

from tests.conformance.conftest import API_TOKEN, SAMPLE_SLIDE, FilledNode
from tests.dicom_factory import comprehensive_3d_sr
from tests.peers import HIGHDICOM_FILES

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
WSM = HIGHDICOM_FILES / "sm_image.dcm"


def base(node: FilledNode) -> str:
    return f"http://127.0.0.1:{node.node.http_port}/dicomweb"


def stored_path(node: FilledNode, uid: str) -> Path:
    return next((node.node.data_dir / "store").rglob(f"{uid}.dcm"))


def multipart_parts(rsp: requests.Response) -> list[tuple[str, bytes]]:
    boundary = re.search(r"boundary=([^;]+)", rsp.headers["Content-Type"]).group(1)
    out = []
    for chunk in rsp.content.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        ctype = re.search(rb"Content-Type: ([^\r\n]+)", head).group(1).decode()
        out.append((ctype, data[:-2]))
    return out


def stow_body(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "cytonodeTESTboundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
                    for f in files) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_access_needs_token_or_session(filled_node: FilledNode) -> None:
    url = base(filled_node) + "/studies"
    rsp = requests.get(url, timeout=30)
    assert rsp.status_code == 401 and rsp.json()["error"]
    assert rsp.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    body, ctype = stow_body([WSM.read_bytes()])
    assert requests.post(url, data=body, headers={"Content-Type": ctype},
                         timeout=30).status_code == 401
    assert requests.get(url, headers=AUTH, timeout=30).status_code == 200


def test_qido_matches_stored_headers(filled_node: FilledNode) -> None:
    headers = filled_node.headers()
    url = base(filled_node)
    studies = requests.get(f"{url}/studies", headers=AUTH, timeout=30).json()
    assert {s["0020000D"]["Value"][0] for s in studies} == {
        str(h.StudyInstanceUID) for h in headers.values()}
    hd_study = str(dcmread(WSM, stop_before_pixels=True).StudyInstanceUID)
    got = requests.get(f"{url}/studies", params={"PatientID": "AA01", "StudyDate": "20190101-"},
                       headers=AUTH, timeout=30).json()
    assert [s["0020000D"]["Value"][0] for s in got] == [hd_study]
    assert got[0]["00100010"]["Value"][0]["Alphabetic"] == "Test^Patient"
    assert got[0]["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{hd_study}")
    # keyword or tag, wildcard, limit and offset, UID list with commas
    by_tag = requests.get(f"{url}/studies", params={"00100010": "test^pat*"}, headers=AUTH,
                          timeout=30).json()
    assert [s["0020000D"]["Value"][0] for s in by_tag] == [hd_study]
    page = requests.get(f"{url}/studies", params={"limit": 1, "offset": 1}, headers=AUTH,
                        timeout=30).json()
    assert len(page) == 1 and page[0] == studies[1]
    empty = requests.get(f"{url}/studies", params={"PatientID": "NOBODY"}, headers=AUTH, timeout=30)
    assert (empty.status_code, empty.json()) == (200, [])
    assert requests.get(f"{url}/studies", params={"NoSuchKeyword": "x"}, headers=AUTH,
                        timeout=30).status_code == 400

    series = requests.get(f"{url}/studies/{hd_study}/series", headers=AUTH, timeout=30).json()
    assert {s["0020000E"]["Value"][0] for s in series} == {
        str(h.SeriesInstanceUID) for h in headers.values() if h.StudyInstanceUID == hd_study}
    for s in series:
        uid = s["0020000E"]["Value"][0]
        instances = requests.get(f"{url}/studies/{hd_study}/series/{uid}/instances",
                                 params={"includefield": "ImageType"}, headers=AUTH,
                                 timeout=30).json()
        for inst in instances:
            h = headers[inst["00080018"]["Value"][0]]
            assert inst["00080016"]["Value"][0] == h.SOPClassUID
            if "Rows" in h:
                assert inst["00280010"]["Value"][0] == h.Rows
                assert inst["00080008"]["Value"] == list(h.ImageType)
            assert int(inst.get("00280008", {}).get("Value", [1])[0]) == int(
                h.get("NumberOfFrames", 1))
    uids = sorted(headers)[:2]
    listed = requests.get(f"{url}/instances", params={"SOPInstanceUID": ",".join(uids)},
                          headers=AUTH, timeout=30).json()
    assert sorted(i["00080018"]["Value"][0] for i in listed) == uids


def _slide(node: FilledNode) -> tuple[str, str, str, Path]:
    path = sorted(SAMPLE_SLIDE.glob("*.dcm"))[1]  # the base level, 32 JPEG frames
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), path


def test_wado_instance_as_stored_and_uncompressed(filled_node: FilledNode) -> None:
    study, series, sop, sent = _slide(filled_node)
    url = f"{base(filled_node)}/studies/{study}/series/{series}/instances/{sop}"
    rsp = requests.get(url, headers={**AUTH, "Accept": 'multipart/related; '
                                     'type="application/dicom"; transfer-syntax=*'}, timeout=60)
    assert rsp.status_code == 200
    [(ctype, data)] = multipart_parts(rsp)
    assert "transfer-syntax=1.2.840.10008.1.2.4.50" in ctype
    assert data == stored_path(filled_node, sop).read_bytes()
    # default: explicit VR little endian, decoded from the stored JPEG frames
    rsp = requests.get(url, headers={**AUTH, "Accept": 'multipart/related; type="application/dicom"'},
                       timeout=120)
    [(ctype, data)] = multipart_parts(rsp)
    got = dcmread(io.BytesIO(data))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(got.pixel_array, dcmread(sent).pixel_array)
    # the whole series
    rsp = requests.get(f"{base(filled_node)}/studies/{study}/series/{series}",
                       headers={**AUTH, "Accept": 'multipart/related; type="application/dicom"; '
                                'transfer-syntax=*'}, timeout=120)
    assert len(multipart_parts(rsp)) == len(list(SAMPLE_SLIDE.glob("*.dcm")))
    assert requests.get(f"{base(filled_node)}/studies/1.2.3.4", headers=AUTH,
                        timeout=30).status_code == 404
    assert requests.get(f"{base(filled_node)}/studies/..%2Fetc", headers=AUTH,
                        timeout=30).status_code in (400, 404)


def test_wado_metadata_frames_rendered(filled_node: FilledNode) -> None:
    study, series, sop, sent = _slide(filled_node)
    url = f"{base(filled_node)}/studies/{study}/series/{series}/instances/{sop}"
    ds = dcmread(sent)
    [meta] = requests.get(url + "/metadata", headers=AUTH, timeout=30).json()
    expected = dcmread(sent, stop_before_pixels=True).to_json_dict(bulk_data_threshold=1 << 20)
    for tag in ("00080016", "00080018", "00480006", "00480007", "00280010", "00280008",
                "00480008"):
        assert meta[tag] == expected[tag], tag
    assert meta["7FE00010"]["BulkDataURI"].startswith(url + "/frames/1,2,")

    jpeg = requests.get(url + "/frames/1,3", headers={
        **AUTH, "Accept": 'multipart/related; type="image/jpeg"'}, timeout=30)
    assert jpeg.status_code == 200
    fragments = [b"".join(f) for f in generate_fragmented_frames(
        ds.PixelData, number_of_frames=int(ds.NumberOfFrames))]
    assert [d for _, d in multipart_parts(jpeg)] == [fragments[0], fragments[2]]
    native = requests.get(url + "/frames/2", headers={
        **AUTH, "Accept": 'multipart/related; type="application/octet-stream"'}, timeout=60)
    [(ctype, data)] = multipart_parts(native)
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(ds.Rows, ds.Columns, 3),
                          ds.pixel_array[1])
    assert requests.get(url + "/frames/999", headers=AUTH, timeout=30).status_code == 404
    assert requests.get(url + "/frames/1", headers={**AUTH, "Accept": 'multipart/related; '
                        'type="image/jls"'}, timeout=30).status_code == 406

    # frames of an uncompressed instance are byte slices of Pixel Data
    wsm = dcmread(WSM)
    wurl = (f"{base(filled_node)}/studies/{wsm.StudyInstanceUID}/series/{wsm.SeriesInstanceUID}"
            f"/instances/{wsm.SOPInstanceUID}")
    [(_, frame2)] = multipart_parts(requests.get(wurl + "/frames/2", headers=AUTH, timeout=30))
    size = wsm.Rows * wsm.Columns * 3
    assert frame2 == bytes(wsm.PixelData)[size:2 * size]

    rendered = requests.get(url + "/rendered", headers={**AUTH, "Accept": "image/png"}, timeout=30)
    assert rendered.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(rendered.content))
    assert image.size == (ds.Columns, ds.Rows)
    assert np.array_equal(np.asarray(image), ds.pixel_array[0])
    frame = requests.get(url + "/frames/4/rendered", headers=AUTH, timeout=30)
    assert frame.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(frame.content)).size == (ds.Columns, ds.Rows)


def test_stow_stores_through_the_store_and_reports(filled_node: FilledNode, tmp_path: Path) -> None:
    sr = dcmread(comprehensive_3d_sr(WSM, tmp_path / "sr.dcm"))
    # its own patient and study: the other tests count what the shared node holds
    sr.StudyInstanceUID, sr.PatientID, sr.PatientName = generate_uid(), "STOW01", "Stow^Test"
    sr.StudyDate = sr.ContentDate = "20250101"
    sr_path = tmp_path / "stow.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    body, ctype = stow_body([sr_path.read_bytes(), b"not a dicom file at all"])
    rsp = requests.post(base(filled_node) + "/studies", data=body,
                        headers={**AUTH, "Content-Type": ctype, "Accept": "application/dicom+json"},
                        timeout=60)
    assert rsp.status_code == 202, rsp.text
    result = rsp.json()
    [ref] = result["00081199"]["Value"]
    assert ref["00081155"]["Value"] == [sr.SOPInstanceUID]
    [failed] = result["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    stored = stored_path(filled_node, sr.SOPInstanceUID)
    assert dcmread(stored).ContentSequence == sr.ContentSequence
    # it is found by QIDO and retrievable at its RetrieveURL
    found = requests.get(base(filled_node) + "/instances", params={"SOPInstanceUID": sr.SOPInstanceUID},
                         headers=AUTH, timeout=30).json()
    assert len(found) == 1
    again = requests.get(ref["00081190"]["Value"][0], headers={
        **AUTH, "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
    assert multipart_parts(again)[0][1] == stored.read_bytes()

    # all failed: 409; a study URL that does not match the instance: C409
    other = sr.copy()
    other.SOPInstanceUID = generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    buf = io.BytesIO()
    other.save_as(buf, enforce_file_format=True)
    body, ctype = stow_body([buf.getvalue()])
    rsp = requests.post(base(filled_node) + "/studies/1.2.3.4", data=body,
                        headers={**AUTH, "Content-Type": ctype}, timeout=60)
    assert rsp.status_code == 409
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC409]
    rsp = requests.post(base(filled_node) + "/studies", data=b"x",
                        headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert rsp.status_code == 415


def test_session_access_and_csrf_for_stow(tmp_path: Path) -> None:
    from dicom_node.app.web import make_web_app
    from dicom_node.settings import Settings

    app = make_web_app(Settings(data_dir=tmp_path, api_token=""))
    client = app.test_client()
    assert client.get("/dicomweb/studies").status_code == 401
    assert client.get("/dicomweb/studies", headers={"Authorization": "Bearer "}).status_code == 401
    with client.session_transaction() as s:
        s["user_id"] = 1
        s["sid"] = "session-1"  # a session id, as login gives (logout revokes it)
        s["csrf_token"] = "csrf-123"
    rsp = client.get("/dicomweb/studies")
    assert rsp.status_code == 200 and json.loads(rsp.data) == []
    body, ctype = stow_body([WSM.read_bytes()])
    assert client.post("/dicomweb/studies", data=body,
                       headers={"Content-Type": ctype}).status_code == 403
    assert client.post("/dicomweb/studies", data=body, headers={
        "Content-Type": ctype, "X-CSRF-Token": "wrong"}).status_code == 403
    rsp = client.post("/dicomweb/studies", data=body,
                      headers={"Content-Type": ctype, "X-CSRF-Token": "csrf-123"})
    assert rsp.status_code == 200, rsp.data
    assert (tmp_path / "store").rglob(f"{dcmread(WSM).SOPInstanceUID}.dcm")


@pytest.mark.parametrize("path", ["/studies/1.2.3/series/1.2.3/instances/<script>/metadata",
                                  "/studies/1.2.3'%20OR%201=1/series"])
def test_untrusted_path_segments_are_refused(filled_node: FilledNode, path: str) -> None:
    rsp = requests.get(base(filled_node) + path, headers=AUTH, timeout=30)
    assert rsp.status_code == 400
    assert "<script>" not in rsp.text


def test_annotation_metadata_carries_the_coordinates(filled_node: FilledNode) -> None:
    """A web slide viewer reads our annotations from the metadata alone (values inlined)."""
    from pydicom import Dataset

    ann = dcmread(HIGHDICOM_FILES / "sm_annotations.dcm")
    url = (f"{base(filled_node)}/studies/{ann.StudyInstanceUID}/series/{ann.SeriesInstanceUID}"
           f"/metadata")
    [meta] = requests.get(url, headers=AUTH, timeout=30).json()
    got = Dataset.from_json(meta)
    assert got.SOPInstanceUID == ann.SOPInstanceUID
    for mine, theirs in zip(got.AnnotationGroupSequence, ann.AnnotationGroupSequence, strict=True):
        for kw in ("PointCoordinatesData", "DoublePointCoordinatesData",
                   "LongPrimitivePointIndexList", "GraphicType", "AnnotationGroupUID"):
            assert mine.get(kw) == theirs.get(kw), kw
    assert "7FE00010" not in meta
