"""Limits on what a peer can make the SCP read, and damaged datasets that must not be acknowledged
(issue 22, defects 2, 3, 4). Real sockets against a real ``cytonode serve``."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from tests.dicom_factory import deflate, deflate_bomb, nested_sequences
from tests.peers import NodeProcess, echo

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
CANNOT_UNDERSTAND = 0xC000


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    """What the node sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _send_until_refused(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` zero bytes; return how many went before the node closed the connection."""
    sock.settimeout(10)
    block, sent = bytes(1 << 20), 0
    try:
        while sent < total:
            sock.sendall(block)
            sent += len(block)
    except OSError:  # refused: reset, broken pipe, or our side closed on the node's A-ABORT
        pass
    return sent


def _web_app_line(line: str) -> bool:
    """A log line of the web application (the viewer, or the app's web server starting up beside
    the SCP), not of the association under test."""
    return " viewer." in line or " dicom_node.app.web:" in line


#: A-ABORT PDU (PS3.8 9.3.8): source 2 (service-provider), reason 6 (invalid PDU parameter value).
ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


def test_pdu_header_claiming_4_gib_is_refused_before_association(start_node) -> None:
    node = start_node()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
        assert _recv_all(sock, 10) == ABORT_INVALID_PARAMETER

    time.sleep(0.5)
    before = node.rss()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
        sent = _send_until_refused(sock, 512 << 20)
    assert sent < 64 << 20, f"the node read {sent} bytes of a PDU it should have refused"
    growth = node.rss() - before
    assert growth < 16 << 20, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert echo(node.port)
    assert "Traceback" not in node.log()


def test_pdata_larger_than_max_pdu_aborts_the_association(start_node) -> None:
    node = start_node(max_pdu=65536)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(SECONDARY_CAPTURE, EXPLICIT_LE)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CYTONODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 65536
    before = node.rss()
    raw = assoc.dul.socket.socket
    try:
        raw.sendall(struct.pack(">BBL", 0x04, 0, 128 << 20))
        sent = _send_until_refused(raw, 128 << 20)
    finally:
        deadline = time.monotonic() + 10
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sent < 64 << 20, f"the node read {sent} bytes of a P-DATA it should have refused"
    assert assoc.is_aborted, "the node did not abort the association"
    growth = node.rss() - before
    # Reading the P-DATA would add its 128 MiB; the first association's lazily imported code and
    # allocator arenas measured up to 29 MiB on a busy machine (CI, 2026-12-04).
    assert growth < 48 << 20, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert echo(node.port)
    log = node.log()
    assert "CYTONODE_MAX_PDU" in log and "Traceback" not in log


# Damaged datasets -------------------------------------------------------------------------------

def _identified(**elements: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "FUZZ01", "OT"
    for name, value in elements.items():
        setattr(ds, name, value)
    return ds


def _explicit_le(ds: Dataset) -> bytes:
    data = encode(ds, False, True)
    assert data is not None
    return data


def _image(pixels: int = 4096) -> Dataset:
    side = int(pixels ** 0.5)
    return _identified(SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", Rows=side,
                       Columns=side, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0,
                       PixelData=bytes(random.Random(1).randrange(256) for _ in range(side * side)))


def _store_raw(port: int, ds: Dataset, data: bytes, transfer_syntax: str) -> int:
    """C-STORE ``data`` (the dataset's bytes as they go over the wire) under ``ds``'s UIDs."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(SECONDARY_CAPTURE, transfer_syntax)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CYTONODE")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        req.DataSet = BytesIO(data)
        # As Association.send_c_store does: pause the association's reactor, which would
        # otherwise take the response off the queue.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()


def _stored(node: NodeProcess, ds: Dataset) -> bool:
    return any(p.stem == ds.SOPInstanceUID for p in (node.data_dir / "store").rglob("*.dcm"))


def _assert_refused(node: NodeProcess, ds: Dataset, data: bytes, transfer_syntax: str, what: str
                    ) -> None:
    before = len(node.log().splitlines())
    status = _store_raw(node.port, ds, data, transfer_syntax)
    assert status & 0xF000 == CANNOT_UNDERSTAND, f"{what}: status 0x{status:04X}"
    assert not _stored(node, ds), f"{what}: stored"
    time.sleep(0.2)
    lines = [line for line in node.log().splitlines()[before:] if ds.SOPInstanceUID in line
             or "Traceback" in line or "Error" in line]
    assert len(lines) == 1, f"{what}: log lines\n" + "\n".join(lines)
    assert "Traceback" not in node.log(), what


def test_damaged_deflated_and_sequence_data_are_not_acknowledged(start_node) -> None:
    node = start_node()
    # A good deflated image is stored (the check must not refuse sound data).
    good = _image()
    assert _store_raw(node.port, good, deflate(_explicit_le(good)), DEFLATED) == 0
    assert _stored(node, good)

    # Truncated inside Pixel Data, then deflated: a complete deflate stream of a short dataset.
    ds = _image()
    plain = _explicit_le(ds)
    _assert_refused(node, ds, deflate(plain[:-1000]), DEFLATED, "truncated, then deflated")
    # The deflate stream itself cut off inside Pixel Data.
    ds = _image()
    deflated = deflate(_explicit_le(ds))
    _assert_refused(node, ds, deflated[: len(deflated) * 3 // 4], DEFLATED, "deflate stream cut")

    # An unknown VR inside a sequence item.
    ds = _identified(ConceptNameCodeSequence=Sequence([Dataset()]))
    item = ds.ConceptNameCodeSequence[0]
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "123", "99X", "thing"
    data = _explicit_le(ds)
    assert data.count(b"SH\x04\x00123 ") == 1
    _assert_refused(node, ds, data.replace(b"SH\x04\x00123 ", b"ZZ\x04\x00123 "), EXPLICIT_LE,
                    "unknown VR in a sequence")
    assert echo(node.port)


@contextmanager
def _peak_rss_growth(node: NodeProcess) -> Iterator[list[int]]:
    """Sample the node's RSS every 20 ms while the block runs; yields a list that then holds the
    peak's growth over the RSS before it (a large buffer freed at once leaves no trace after)."""
    before = node.rss()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], node.rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth = [0]
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
        growth[0] = max(peak[0], node.rss()) - before


def test_deflate_bomb_is_refused_before_it_is_inflated(start_node) -> None:
    """A sound-looking deflated image whose 3 GiB of Pixel Data travel as 3 MB of deflate stream:
    refused from its inflated size, never inflated whole (pydicom inflates a deflated data set
    in memory to read it)."""
    node = start_node()
    frames, side = 12, 16384  # 12 frames of 16384 x 16384 at 8 bits: 3 GiB
    ds = _identified(SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", Rows=side,
                     Columns=side, NumberOfFrames=frames, BitsAllocated=8, BitsStored=8, HighBit=7,
                     PixelRepresentation=0)
    length = frames * side * side
    header = _explicit_le(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, length)
    bomb = deflate_bomb(header, length)
    assert len(bomb) < 8 << 20
    time.sleep(0.5)
    with _peak_rss_growth(node) as growth:
        _assert_refused(node, ds, bomb, DEFLATED, "deflate bomb")
    assert growth[0] < 50 << 20, f"RSS grew by {growth[0] / 2**20:.0f} MiB"
    assert "CYTONODE_MAX_INFLATED_BYTES" in node.log()
    assert echo(node.port)
    assert os.listdir(node.data_dir / "tmp") == []


def test_sequence_items_of_undefined_length_are_accepted(start_node) -> None:
    """Many senders (DCMTK among them) write sequences and items of undefined length."""
    node = start_node()
    ds = _identified()
    item = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 4) + b"123 "
    sequence = (struct.pack("<HH2sHL", 0x0040, 0xA043, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
                + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    plain = _explicit_le(ds)
    # (0040,A043) sorts after every element of ``ds``: append it.
    assert _store_raw(node.port, ds, plain + sequence, EXPLICIT_LE) == 0
    assert _stored(node, ds)


def test_undecodable_data_gets_cannot_understand_without_traceback(start_node) -> None:
    node = start_node()
    ds = _identified()
    garbage = bytes(random.Random(7).randrange(256) for _ in range(3000))
    _assert_refused(node, ds, garbage, DEFLATED, "deflate garbage")

    ds = _identified()
    # Elements up to (0020,000E), then 200 nested sequences: the UIDs decode, the rest does not.
    _assert_refused(node, ds, _explicit_le(ds) + nested_sequences(200), EXPLICIT_LE, "200 nested sequences")
    assert echo(node.port)
    assert os.listdir(node.data_dir / "tmp") == []


def _pdata(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU: a single PDV, the last fragment of a command."""
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def test_undecodable_dimse_command_aborts_without_traceback(start_node) -> None:
    """A command set pynetdicom cannot turn into a message (no Command Data Set Type; a UID
    where a number belongs) aborts the association, in one log line."""
    node = start_node()
    commands = []
    for fields in ((0x0120, None), (0x0000, b"1.2.840.10008.1.1\x00")):
        ds = Dataset()
        ds.AffectedSOPClassUID = "1.2.840.10008.1.1"
        ds.CommandField, ds.MessageID = 0x0030, 1
        if fields[1] is None:  # no CommandDataSetType
            commands.append(encode(ds, True, True))
        else:  # the group length holds a UID's bytes
            ds.CommandDataSetType = 0x0101
            data = encode(ds, True, True)
            commands.append(struct.pack("<HHI", 0, 0, len(fields[1])) + fields[1] + data)
    for command in commands:
        before = len(node.log().splitlines())
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CYTONODE")
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(_pdata(assoc.accepted_contexts[0].context_id, command))
        deadline = time.monotonic() + 10
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
        time.sleep(0.5)
        lines = node.log().splitlines()[before:]
        assert "Traceback" not in node.log(), "\n".join(lines)
        lines = [line for line in lines if "established" not in line and not _web_app_line(line)]
        assert len(lines) <= 1, lines
    assert echo(node.port)


def test_command_set_split_over_endless_fragments_aborts(start_node) -> None:
    """Command fragments that never end (no last-fragment bit, PS3.8 E.2) are not buffered
    without bound: past 64 KiB the association is aborted, in one log line."""
    node = start_node()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CYTONODE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    before = len(node.log().splitlines())
    fragment = bytes(16 * 1024)
    # One PDV per P-DATA-TF, message control header 0x01: a command fragment, not the last.
    pdu = struct.pack(">BBI", 0x04, 0, len(fragment) + 6) + struct.pack(
        ">IBB", len(fragment) + 2, context_id, 0x01) + fragment
    raw = assoc.dul.socket.socket
    raw.settimeout(10)
    sent = 0
    try:
        while sent < 64 << 20 and assoc.is_alive():  # 64 MiB of command set, if the node reads it
            raw.sendall(pdu)
            sent += len(fragment)
    except OSError:  # the node aborted and closed the connection
        pass
    deadline = time.monotonic() + 10
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, f"not aborted after {sent} bytes of command set"
    assert sent < 8 << 20, f"the node read {sent} bytes of command set"
    time.sleep(0.5)
    lines = [line for line in node.log().splitlines()[before:] if not _web_app_line(line)]
    assert len(lines) == 1 and "command set of more than 65536 bytes" in lines[0], lines
    assert "Traceback" not in node.log()
    assert echo(node.port)


def test_deflate_bomb_by_stow_rs_is_refused_before_it_is_inflated(start_node) -> None:
    """The same bomb as a Part 10 file posted to STOW-RS: 0xC000 for that part, memory flat."""
    import io

    import requests
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    node = start_node(api_token="stow-token")
    frames, side = 12, 16384
    ds = _identified(SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", Rows=side,
                     Columns=side, NumberOfFrames=frames, BitsAllocated=8, BitsStored=8, HighBit=7,
                     PixelRepresentation=0)
    length = frames * side * side
    header = _explicit_le(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, length)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    part10 = io.BytesIO()
    part10.write(bytes(128) + b"DICM")
    write_file_meta_info(part10, meta, enforce_standard=True)
    part10.write(deflate_bomb(header, length))
    boundary = "bombBOUNDARY"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10.getvalue()
            + f"\r\n--{boundary}--\r\n".encode())
    time.sleep(0.5)
    with _peak_rss_growth(node) as growth:
        rsp = requests.post(
            f"http://127.0.0.1:{node.http_port}/dicomweb/studies", data=body, timeout=120,
            headers={"Authorization": "Bearer stow-token", "Accept": "application/dicom+json",
                     "Content-Type": f'multipart/related; type="application/dicom"; '
                                     f'boundary={boundary}'})
    assert rsp.status_code == 409, rsp.text
    assert rsp.json()["00081198"]["Value"][0]["00081197"]["Value"] == [CANNOT_UNDERSTAND]
    assert growth[0] < 50 << 20, f"RSS grew by {growth[0] / 2**20:.0f} MiB"
    assert echo(node.port)
    assert os.listdir(node.data_dir / "tmp") == []


def _item(item_type: int, content: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(content)) + content


def test_malformed_presentation_contexts_are_refused_without_traceback(start_node) -> None:
    """pynetdicom raises while negotiating an A-ASSOCIATE-RQ whose presentation context ID is even
    (PS3.8 9.3.2.2: odd, 1-255) or that has no abstract syntax, and its DUL or association thread
    died with a traceback (both found by the fuzzer, seed 23)."""
    node = start_node()
    verification = _item(0x30, b"1.2.840.10008.1.1")
    implicit = _item(0x40, b"1.2.840.10008.1.2")
    cases = {"presentation context ID 2": bytes([2, 0, 0, 0]) + verification + implicit,
             "without one abstract syntax": bytes([1, 0, 0, 0]) + implicit}
    for expected, context in cases.items():
        body = (struct.pack(">HH", 1, 0) + b"CYTONODE".ljust(16) + b"FUZZ".ljust(16) + bytes(32)
                + _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context)
                + _item(0x50, _item(0x51, struct.pack(">L", 16384))))
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
            assert _recv_all(sock, 10) == ABORT_INVALID_PARAMETER, expected
        time.sleep(0.5)
        assert echo(node.port)
        log = node.log()
        assert "Traceback" not in log and expected in log, expected
