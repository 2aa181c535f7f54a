"""A structural check of a received dataset: every element's length fits the file.

pydicom reads truncated data tolerantly (a warning, a shorter dataset); the node
must not acknowledge such a dataset. This walks the element headers (PS3.5 7.1)
of a little-endian dataset, seeking past values, so it costs a few reads even
for a large multi-frame slide.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from dicom_node.errors import InvalidInstanceError

# PS3.5 7.1.2: VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32


def _tag(raw: bytes) -> int:
    group, element = struct.unpack("<HH", raw)
    return int((group << 16) | element)


def _read(fp: BinaryIO, n: int) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise InvalidInstanceError(f"dataset truncated at byte {fp.tell()}")
    return data


def _walk(fp: BinaryIO, end: int, explicit: bool, depth: int, until_delimiter: int | None) -> None:
    """Walk elements until ``end`` (defined length) or the delimiter tag (undefined length)."""
    if depth > _MAX_DEPTH:
        raise InvalidInstanceError("sequences nested too deeply")
    while fp.tell() < end or until_delimiter is not None:
        tag = _tag(_read(fp, 4))
        if tag in (_ITEM, _ITEM_END, _SEQ_END):
            length = struct.unpack("<I", _read(fp, 4))[0]
            if tag == until_delimiter:
                return
            if tag != _ITEM:
                raise InvalidInstanceError(f"unexpected delimiter {tag:08X} at byte {fp.tell()}")
            _item(fp, length, explicit, depth)
            continue
        vr = b""
        if explicit:
            vr = _read(fp, 2)
            if vr in _LONG_VRS:
                _read(fp, 2)
                length = struct.unpack("<I", _read(fp, 4))[0]
            else:
                length = struct.unpack("<H", _read(fp, 2))[0]
        else:
            length = struct.unpack("<I", _read(fp, 4))[0]
        if length == _UNDEFINED:
            # An undefined-length sequence, or encapsulated pixel data: items to a delimiter.
            # Inside an encapsulated element the items are fragments, not datasets.
            fragments = tag == 0x7FE00010 or (explicit and vr in (b"OB", b"OW"))
            _walk_items(fp, explicit, depth + 1, fragments)
            continue
        if fp.seek(length, 1) > end:
            raise InvalidInstanceError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of "
                                       f"{length} bytes runs past the end of the data")


def _walk_items(fp: BinaryIO, explicit: bool, depth: int, fragments: bool) -> None:
    while True:
        tag = _tag(_read(fp, 4))
        length = struct.unpack("<I", _read(fp, 4))[0]
        if tag == _SEQ_END:
            return
        if tag != _ITEM:
            raise InvalidInstanceError(f"expected an item tag, found {tag:08X}")
        if fragments:
            fp.seek(length, 1)
            _read(fp, 0)
            continue
        _item(fp, length, explicit, depth)


def _item(fp: BinaryIO, length: int, explicit: bool, depth: int) -> None:
    if length == _UNDEFINED:
        _walk(fp, 0, explicit, depth + 1, _ITEM_END)
    else:
        _walk(fp, fp.tell() + length, explicit, depth + 1, None)


def check_structure(fp: BinaryIO, offset: int, size: int, transfer_syntax: str) -> None:
    """Raise :class:`InvalidInstanceError` unless the dataset from ``offset`` to ``size``
    is a complete sequence of elements. Deflated and big-endian data are not walked."""
    if transfer_syntax in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):
        return
    explicit = transfer_syntax != "1.2.840.10008.1.2"
    fp.seek(offset)
    _walk(fp, size, explicit, 0, None)
    if fp.tell() != size:
        raise InvalidInstanceError(f"dataset ends at byte {fp.tell()}, the data at {size}")
