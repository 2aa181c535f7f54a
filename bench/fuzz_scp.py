"""Fuzz the DICOM SCP with malformed input; check that it holds and acknowledges nothing damaged.

Starts a fresh ``cytonode serve`` (its own data directory, loopback ports), then sends up to
``--count`` generated inputs within ``--time-limit`` seconds, over raw sockets (no DICOM library
on the sending side, so anything can be sent):

- transport: connect and close; random bytes; a PDU header claiming up to 4 GiB; a mutated
  (bit-flipped, truncated, extended) A-ASSOCIATE-RQ;
- association: random P-DATA, a P-DATA larger than the node's maximum PDU, a mutated C-ECHO
  command, a command set in fragments that never end (up to 256 KiB), a C-STORE cut off mid-data
  set;
- data set (a C-STORE on a valid association, explicit, implicit or deflated): valid (controls),
  truncated inside Pixel Data, truncated anywhere, bit flips, an element length or VR replaced,
  deep sequence nesting, deflate garbage, a cut deflate stream, a deflated truncated data set.

Each acknowledged data set is checked against an oracle independent of the node's own check:
a strict pydicom read (warnings are errors, every value decoded, Pixel Data of full length) of
exactly the bytes sent, plus what the mutation is known to have done. At the end: the node must
answer C-ECHO, have acknowledged 0 damaged data sets and answered no 0x0110, its log must hold
no traceback, its RSS must not have grown by 50 MB or more and ``tmp/`` must be empty.

    .venv/bin/python bench/fuzz_scp.py [--count 10000] [--time-limit 900] [--concurrency 4]
                                       [--seed 0] [--json]

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from tests.dicom_factory import deflate, nested_sequences
from tests.peers import NodeProcess, echo

SC = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
SYNTAXES = (EXPLICIT, IMPLICIT, DEFLATED)
OUR_MAX_PDU = 16384
RSS_LIMIT = 50 * 1024 * 1024
#: Mutations that always damage a data set: acknowledging one is a failure whatever the oracle says.
ALWAYS_DAMAGED = {"truncate-pixels", "bad-vr", "deflate-garbage", "deflate-cut", "deflate-of-truncated"}


# Upper layer, by hand (PS3.8 9.3) -----------------------------------------------------------

def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def associate_rq(syntax: str, abstract: str = SC, calling: str = "FUZZ") -> bytes:
    body = struct.pack(">HH", 1, 0) + b"CYTONODE".ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    body += _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode()) + _item(0x40, syntax.encode()))
    body += _item(0x50, _item(0x51, struct.pack(">I", OUR_MAX_PDU)) + _item(0x52, b"1.2.826.0.1.3680043.9.3811"))
    return struct.pack(">BBI", 1, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBI", 5, 0, 4) + bytes(4)


class Peer:
    """One TCP connection to the node, speaking the upper layer by hand."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes] | None:
        head = self._exactly(6)
        if head is None:
            return None
        kind, _, length = struct.unpack(">BBI", head)
        if length > 16 << 20:
            return None
        body = self._exactly(length)
        return None if body is None else (kind, body)

    def associate(self, syntax: str, abstract: str = SC) -> bool:
        if not self.send(associate_rq(syntax, abstract)):
            return False
        pdu = self.read_pdu()
        if pdu is None or pdu[0] != 0x02:
            return False
        items, pos = pdu[1], 68
        while pos + 4 <= len(items):
            kind, length = items[pos], struct.unpack(">H", items[pos + 2:pos + 4])[0]
            if kind == 0x21 and items[pos + 6] == 0:
                return True
            pos += 4 + length
        return False

    def response_status(self) -> str:
        """The status of the next DIMSE response, or how the node ended the association."""
        command = b""
        while True:
            pdu = self.read_pdu()
            if pdu is None:
                return "closed"
            kind, body = pdu
            if kind == 0x07:
                return "aborted"
            if kind != 0x04:
                return f"pdu-0x{kind:02X}"
            pos = 0
            while pos + 6 <= len(body):
                length = struct.unpack(">I", body[pos:pos + 4])[0]
                header, value = body[pos + 5], body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if header & 1:
                    command += value
                    if header & 2:
                        status = decode(BytesIO(command), True, True).get("Status")
                        return "no-status" if status is None else f"0x{int(status):04X}"

    def release(self) -> None:
        if self.send(RELEASE_RQ):
            self.read_pdu()
        self.close()


def _encoded(msg: C_STORE_RQ | C_ECHO_RQ) -> bytes:
    out = b""
    for primitive in msg.encode_msg(1, OUR_MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    return out


def store_pdus(sop_instance_uid: str, data: bytes) -> bytes:
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = SC, sop_instance_uid
    req.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return _encoded(msg)


def echo_pdus() -> bytes:
    req = C_ECHO()
    req.MessageID = 1
    req.AffectedSOPClassUID = VERIFICATION
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    return _encoded(msg)


# Data sets and their mutations --------------------------------------------------------------

def base_dataset(rng: random.Random, pixels: bool = True) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.ConversionType = "FUZZ", "Fuzz^Test", "OT", "WSD"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-C4000", "SRT", "Blood"
    ds.AnatomicRegionSequence = Sequence([item])
    if pixels:
        side = rng.choice((16, 32, 48))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.randbytes(side * side)
    return ds


def plain(ds: Dataset, syntax: str) -> bytes:
    data = encode(ds, syntax == IMPLICIT, True)
    assert data is not None
    return data


def element_headers(data: bytes, implicit: bool, start: int = 0, end: int | None = None) -> list[int]:
    """Offsets of every element header of a well-formed data set (defined lengths, as pydicom
    writes them), in sequence items too."""
    end = len(data) if end is None else end
    out, pos = [], start
    while pos < end:
        group, element = struct.unpack("<HH", data[pos:pos + 4])
        out.append(pos)
        if implicit:
            vr = str(dictionary_VR((group << 16) | element)).encode() if (group, element) != (0xFFFE, 0xE000) else b""
            length, value = struct.unpack("<I", data[pos + 4:pos + 8])[0], pos + 8
        else:
            vr = data[pos + 4:pos + 6]
            if vr in LONG_VRS:
                length, value = struct.unpack("<I", data[pos + 8:pos + 12])[0], pos + 12
            else:
                length, value = struct.unpack("<H", data[pos + 6:pos + 8])[0], pos + 8
        if vr == b"SQ":
            item = value
            while item < value + length:
                item_length = struct.unpack("<I", data[item + 4:item + 8])[0]
                out += element_headers(data, implicit, item + 8, item + 8 + item_length)
                item += 8 + item_length
        pos = value + length
    return out


LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def mutate(kind: str, rng: random.Random) -> tuple[Dataset, str, bytes]:
    """(the identifying data set, transfer syntax, bytes to send) for a data-set mutation."""
    syntax = rng.choice(SYNTAXES)
    if kind == "nested":
        ds = base_dataset(rng, pixels=False)
        return ds, EXPLICIT, plain(ds, EXPLICIT) + nested_sequences(rng.choice((2, 8, 30, 33, 64, 200, 500)))
    ds = base_dataset(rng)
    if kind == "bad-vr":
        syntax = rng.choice((EXPLICIT, DEFLATED))
    data = plain(ds, EXPLICIT if syntax == DEFLATED else syntax)
    pixel_start = len(data) - len(ds.PixelData)
    if kind == "valid":
        pass
    elif kind == "truncate-pixels":
        data = data[:rng.randrange(pixel_start, len(data) - 1)]
    elif kind == "truncate-any":
        data = data[:rng.randrange(1, len(data) - 1)]
    elif kind == "bitflip":
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(pixel_start)  # in the header: pixel values cannot be checked
            flipped[i] ^= 1 << rng.randrange(8)
        data = bytes(flipped)
    elif kind == "length":
        raw = bytearray(data)
        i = rng.choice(element_headers(data, syntax == IMPLICIT))
        if syntax == IMPLICIT or data[i + 4:i + 6] in LONG_VRS:
            at = i + 4 if syntax == IMPLICIT else i + 8
            raw[at:at + 4] = struct.pack("<I", rng.choice((0, 1, 3, 0xFFFF, 0xFFFFFFFE, rng.randrange(1 << 32))))
        else:
            raw[i + 6:i + 8] = struct.pack("<H", rng.randrange(1 << 16))
        data = bytes(raw)
    elif kind == "bad-vr":
        raw = bytearray(data)
        i = rng.choice(element_headers(data, False))
        raw[i + 4:i + 6] = rng.choice((b"ZZ", b"QQ", b"XY", b"\x00\x00", b"ob"))
        data = bytes(raw)
    elif kind == "deflate-garbage":
        return ds, DEFLATED, rng.randbytes(rng.randrange(1, 4000))
    elif kind == "deflate-cut":
        packed = deflate(data)
        return ds, DEFLATED, packed[:rng.randrange(1, len(packed) - 1)]
    elif kind == "deflate-of-truncated":
        return ds, DEFLATED, deflate(data[:rng.randrange(pixel_start, len(data) - 1)])
    else:
        raise ValueError(kind)
    return ds, syntax, deflate(data) if syntax == DEFLATED else data


def damaged(data: bytes, syntax: str) -> bool:
    """The oracle: can the bytes sent not be read in full, strictly?"""
    try:
        if syntax == DEFLATED:
            z = zlib.decompressobj(-zlib.MAX_WBITS)
            data = z.decompress(data)
            if not z.eof or len(z.unused_data) > 1:
                return True
        with warnings.catch_warnings():
            # Any warning is damage, except invalid values: the node stores values as received
            # (only the identifying UIDs are checked, and refused with 0xC001).
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", message="VR lookup failed")  # implicit VR: UN
            config.settings.reading_validation_mode = config.IGNORE
            fp = BytesIO(data)
            ds = read_dataset(fp, syntax == IMPLICIT, True)
            if fp.tell() != len(data):
                return True
            for elem in ds.iterall():
                _ = elem.value
            ds.to_json_dict()
            if "PixelData" in ds:
                expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
                if len(ds.PixelData) < expected:
                    return True
    except Exception:  # noqa: BLE001 - the oracle: anything pydicom raises is damage
        return True
    return False


# The cases ----------------------------------------------------------------------------------

TRANSPORT = ("connect-close", "random-bytes", "huge-pdu-header", "associate-mutated")
ASSOCIATION = ("pdata-garbage", "pdata-oversize", "command-mutated", "command-endless", "store-cut")
DATASET = ("valid", "truncate-pixels", "truncate-any", "bitflip", "length", "bad-vr", "nested",
           "deflate-garbage", "deflate-cut", "deflate-of-truncated")
KINDS = TRANSPORT + ASSOCIATION + DATASET


def run_case(port: int, kind: str, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    out: dict[str, object] = {"kind": kind}
    try:
        # A peer that sent a malformed PDU may get no answer until the node's timeouts: do not
        # wait for one long. A C-STORE of a whole data set gets its answer.
        peer = Peer(port, timeout=30 if kind in DATASET else 3)
    except OSError as exc:
        return {**out, "outcome": f"connect-failed: {exc.__class__.__name__}"}
    try:
        if kind == "connect-close":
            out["outcome"] = "sent"
        elif kind == "random-bytes":
            peer.send(rng.randbytes(rng.randrange(1, 2000)))
            out["outcome"] = "sent"
        elif kind == "huge-pdu-header":
            length = rng.choice((0xFFFFFFFF, 1 << 30, 64 << 20, 5 << 20, 2 << 20))
            peer.send(struct.pack(">BBI", rng.randint(1, 7), 0, length))
            peer.send(bytes(rng.choice((0, 1024, 1 << 20))))
            out["outcome"] = peer.response_status()
        elif kind == "associate-mutated":
            raw = bytearray(associate_rq(rng.choice(SYNTAXES)))
            how = rng.choice(("flip", "truncate", "extend"))
            if how == "flip":
                for _ in range(rng.randint(1, 6)):
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            elif how == "truncate":
                del raw[rng.randrange(6, len(raw)):]
            else:
                raw += rng.randbytes(rng.randrange(1, 200))
            peer.send(bytes(raw))
            pdu = peer.read_pdu()
            out["outcome"] = "closed" if pdu is None else f"pdu-0x{pdu[0]:02X}"
        else:
            syntax = EXPLICIT
            if kind in DATASET:
                ds, syntax, data = mutate(kind, rng)
            abstract = VERIFICATION if kind in ("command-mutated", "command-endless") else SC
            if not peer.associate(syntax, abstract):
                return {**out, "outcome": "association-failed"}
            if kind == "pdata-garbage":
                body = rng.randbytes(rng.randrange(0, 3000))
                peer.send(struct.pack(">BBI", 4, 0, len(body)) + body)
                out["outcome"] = peer.response_status()
            elif kind == "pdata-oversize":
                peer.send(struct.pack(">BBI", 4, 0, rng.choice((4 << 20 | 1, 64 << 20, 0xFFFFFFFF))))
                peer.send(bytes(1 << 20))
                out["outcome"] = peer.response_status()
            elif kind == "command-mutated":
                raw = bytearray(echo_pdus())
                for _ in range(rng.randint(1, 4)):
                    raw[rng.randrange(12, len(raw))] ^= 1 << rng.randrange(8)
                peer.send(bytes(raw))
                out["outcome"] = peer.response_status()
            elif kind == "command-endless":
                # Command fragments (PS3.8 E.2: control header 0x01) without the last one.
                sent = 0
                while sent < 256 << 10:
                    value = bytes(rng.randrange(1, 16 << 10))
                    pdv = struct.pack(">IBB", len(value) + 2, 1, 0x01) + value
                    if not peer.send(struct.pack(">BBI", 4, 0, len(pdv)) + pdv):
                        break
                    sent += len(value)
                out["outcome"] = peer.response_status()
            elif kind == "store-cut":
                sent = base_dataset(rng)
                pdus = store_pdus(sent.SOPInstanceUID, plain(sent, EXPLICIT))
                peer.send(pdus[:rng.randrange(100, len(pdus) - 1)])
                out["outcome"] = "cut"
                out["sop_instance_uid"] = sent.SOPInstanceUID
            else:
                peer.send(store_pdus(ds.SOPInstanceUID, data))
                status = peer.response_status()
                out["outcome"] = status
                if status.startswith("0x"):
                    value = int(status, 16)
                    acknowledged = value == 0 or value & 0xF000 == 0xB000
                    out["acknowledged"] = acknowledged
                    if acknowledged:
                        out["damaged"] = kind in ALWAYS_DAMAGED or damaged(data, syntax)
                    if kind == "valid" and not acknowledged:
                        out["valid_refused"] = True
                peer.release()
    finally:
        peer.close()
    return out


# The run ------------------------------------------------------------------------------------

def rss(node: NodeProcess) -> int:
    """The node's RSS in bytes; 0 when it has none (it exited)."""
    try:
        return node.rss()
    except AssertionError:
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10000, help="inputs to send (default 10000)")
    ap.add_argument("--time-limit", type=float, default=900, help="stop sending after this many s")
    ap.add_argument("--concurrency", type=int, default=4, help="connections at once (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of: " + ",".join(KINDS))
    ap.add_argument("--keep", type=Path, default=None, help="keep the node's data and log here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown or args.count < 1 or args.concurrency < 1:
        ap.error(f"unknown kinds {sorted(unknown)}" if unknown else "--count and --concurrency must be >= 1")

    work = args.keep or Path(tempfile.mkdtemp(prefix="fuzz-scp-"))
    node = NodeProcess(work / "node", max_associations=16)
    node.start()
    try:
        time.sleep(2)  # the HTTP thread and the first routing pass
        results: list[dict[str, object]] = []
        lock = threading.Lock()
        rng = random.Random(args.seed)
        plan = [(rng.choice(kinds), rng.randrange(1 << 31)) for _ in range(args.count)]
        warmup = min(200, args.count // 10)
        started = time.monotonic()
        deadline = started + args.time_limit
        rss_start = rss(node)
        rss_warm = [rss_start]

        def one(item: tuple[int, tuple[str, int]]) -> None:
            index, (kind, seed) = item
            if time.monotonic() > deadline:
                return
            result = run_case(node.port, kind, seed)
            with lock:
                results.append(result)
                if index == warmup:
                    rss_warm[0] = rss(node)
                if len(results) % 1000 == 0:
                    print(f"{len(results)} inputs, {time.monotonic() - started:.0f} s, "
                          f"RSS {rss(node) / 2**20:.0f} MiB", file=sys.stderr)

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, enumerate(plan)))
        elapsed = time.monotonic() - started
        time.sleep(3)  # connections the node is still closing
        rss_end = rss(node)
        tmp_files = [p.name for p in (node.data_dir / "tmp").iterdir()]
        echo_ok = echo(node.port, calling="FUZZ", timeout=10)
        log = node.log()
        tracebacks = log.count("Traceback")
        by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for r in results:
            by_kind[str(r["kind"])][str(r["outcome"])] += 1
        damaged_acknowledged = [r for r in results if r.get("damaged")]
        failures_0110 = sum(1 for r in results if r.get("outcome") == "0x0110")
        summary = {
            "inputs": len(results), "elapsed_s": round(elapsed, 1),
            "inputs_per_s": round(len(results) / elapsed, 1), "concurrency": args.concurrency,
            "seed": args.seed,
            "acknowledged": sum(1 for r in results if r.get("acknowledged")),
            "damaged_acknowledged": len(damaged_acknowledged),
            "damaged_acknowledged_kinds": dict(collections.Counter(str(r["kind"]) for r in damaged_acknowledged)),
            "valid_refused": sum(1 for r in results if r.get("valid_refused")),
            "status_0x0110": failures_0110,
            "echo_ok": echo_ok,
            "tracebacks_in_log": tracebacks,
            "log_lines": len(log.splitlines()), "log_bytes": len(log.encode()),
            "rss_start_mib": round(rss_start / 2**20, 1),
            "rss_after_warmup_mib": round(rss_warm[0] / 2**20, 1),
            "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_growth_mib": round((rss_end - rss_start) / 2**20, 1),
            "tmp_files": len(tmp_files),
            "outcomes": {k: dict(v) for k, v in sorted(by_kind.items())},
        }
        ok = (echo_ok and not damaged_acknowledged and failures_0110 == 0 and tracebacks == 0
              and rss_end - rss_start < RSS_LIMIT and not tmp_files and summary["valid_refused"] == 0)
        summary["pass"] = ok
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            for key, value in summary.items():
                if key != "outcomes":
                    print(f"{key:28} {value}")
            for kind, outcomes in summary["outcomes"].items():
                print(f"  {kind:22} " + ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items())))
        if tracebacks:
            print(log[log.index("Traceback") - 200:][:3000], file=sys.stderr)
        return 0 if ok else 1
    finally:
        node.cleanup()


if __name__ == "__main__":
    sys.exit(main())
