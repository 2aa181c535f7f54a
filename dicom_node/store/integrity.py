"""A structural check of a received dataset: every element fits the data, every VR is known.

pydicom reads damaged data tolerantly (a warning, a shorter dataset, an error only when a value
is first used); the node must not acknowledge such a dataset. This walks the element headers
(PS3.5 7.1) of a little-endian dataset, into sequences and their items (PS3.5 7.5) and past
values, so it costs a few reads even for a large multi-frame slide. A Deflated Explicit VR Little
Endian dataset (PS3.5 A.5) is inflated as it is walked, a window at a time, never whole, and
refused once it inflates past a limit: pydicom inflates such a dataset whole, in memory, to read
it, and a few MB of deflate stream can inflate to gigabytes (a "deflate bomb").
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

from pydicom import Dataset
from pydicom.datadict import dictionary_VR

from dicom_node.errors import InvalidInstanceError

# PS3.5 6.2: every VR. Those with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
                    b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"


class _Data:
    """The dataset's bytes from ``offset`` to ``end`` of a file: read, tell, skip forward."""

    pixel_data_length: int | None = None  # of native (not encapsulated) Pixel Data, if any

    def __init__(self, fp: BinaryIO, offset: int, end: int) -> None:
        self._fp, self.end = fp, end
        fp.seek(offset)

    def read(self, n: int) -> bytes:
        data = self._fp.read(n)
        if len(data) != n:
            raise InvalidInstanceError(f"dataset truncated at byte {self.tell()}")
        return data

    def tell(self) -> int:
        return self._fp.tell()

    def skip(self, n: int) -> None:
        if self._fp.seek(n, 1) > self.end:
            raise InvalidInstanceError(f"dataset truncated: a value runs past byte {self.end}")

    def at_end(self) -> bool:
        return self.tell() >= self.end


class _Inflated:
    """A raw deflate stream (RFC 1951; PS3.5 A.5) inflated forwards, at most ``_WINDOW`` at a time,
    and at most ``max_inflated`` bytes in all (``None``: no limit)."""

    _WINDOW = 1 << 20
    pixel_data_length: int | None = None  # of native (not encapsulated) Pixel Data, if any

    def __init__(self, fp: BinaryIO, offset: int, max_inflated: int | None = None) -> None:
        fp.seek(offset)
        self._fp = fp
        self._max_inflated = max_inflated
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._position = 0  # of the first byte in the buffer, in the inflated dataset

    def _more(self) -> bool:
        """Inflate the next window; ``False`` at the end of the stream."""
        if self._z.eof:
            return False
        data = self._z.unconsumed_tail or self._fp.read(self._WINDOW)
        if not data:
            raise InvalidInstanceError("deflated dataset truncated: its stream has no end block")
        try:
            self._buffer += self._z.decompress(data, self._WINDOW)
        except zlib.error as exc:
            raise InvalidInstanceError(f"deflated dataset cannot be inflated: {exc}") from exc
        if self._max_inflated is not None and self._position + len(self._buffer) > self._max_inflated:
            raise InvalidInstanceError(f"deflated dataset inflates to more than {self._max_inflated} "
                                       "bytes (CYTONODE_MAX_INFLATED_BYTES)")
        if self._z.eof and len(self._z.unused_data) + len(self._fp.read(2)) > 1:
            # PS3.5 A.5: at most one padding byte follows the deflated bit stream.
            raise InvalidInstanceError("data follow the end of the deflated dataset")
        return True

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not self._more():
                raise InvalidInstanceError(f"dataset truncated at byte {self.tell()}")
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._position += n
        return data

    def tell(self) -> int:
        return self._position

    def skip(self, n: int) -> None:
        while n > 0:
            if not self._buffer and not self._more():
                raise InvalidInstanceError(f"dataset truncated: a value runs past byte {self.tell()}")
            step = min(n, len(self._buffer))
            del self._buffer[:step]
            self._position += step
            n -= step

    def at_end(self) -> bool:
        while not self._buffer:
            if not self._more():
                return True
        return False


_Source = _Data | _Inflated


def _tag(raw: bytes) -> int:
    group, element = struct.unpack("<HH", raw)
    return int((group << 16) | element)


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _walk(data: _Source, end: int | None, explicit: bool, depth: int,
          until_delimiter: int | None = None) -> None:
    """Walk elements to ``end`` (a defined-length item's end; ``None``: the end of the data), or,
    for an undefined-length item, to ``until_delimiter``, which must come before ``end``."""
    if depth > _MAX_DEPTH:
        raise InvalidInstanceError(f"sequences nested more than {_MAX_DEPTH} deep")
    while True:
        if until_delimiter is None and (data.at_end() if end is None else data.tell() >= end):
            return
        if end is not None and data.tell() >= end:
            raise InvalidInstanceError(f"item without its delimiter at byte {data.tell()}")
        tag = _tag(data.read(4))
        if tag in (_ITEM, _ITEM_END, _SEQ_END):
            length = struct.unpack("<I", data.read(4))[0]
            if tag == until_delimiter:
                return
            raise InvalidInstanceError(f"unexpected item tag {tag:08X} at byte {data.tell()}")
        vr = b""
        if explicit:
            vr = data.read(2)
            if vr not in _VRS:
                raise InvalidInstanceError(f"element {_name(tag)} has an unknown VR {vr!r}")
            if vr in _LONG_VRS:
                data.read(2)
                length = struct.unpack("<I", data.read(4))[0]
            else:
                length = struct.unpack("<H", data.read(2))[0]
        else:
            length = struct.unpack("<I", data.read(4))[0]
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA or vr in (b"OB", b"OW"):
                _fragments(data, end)  # encapsulated pixel data (PS3.5 A.4)
            elif explicit and vr not in (b"SQ", b"UN"):
                raise InvalidInstanceError(f"element {_name(tag)} ({vr.decode()}) has an "
                                           "undefined length")
            else:
                # A sequence; under VR UN its items are implicit VR (PS3.5 6.2.2).
                _items(data, None, explicit and vr != b"UN", depth + 1, end)
            continue
        if end is not None and data.tell() + length > end:
            raise InvalidInstanceError(f"element {_name(tag)} of {length} bytes runs past the "
                                       f"end of its item at byte {end}")
        if vr == b"SQ" or (not explicit and _is_sequence(tag)):
            _items(data, data.tell() + length, explicit, depth + 1, end)
        else:
            if tag == _PIXEL_DATA and depth == 0:
                data.pixel_data_length = length
            data.skip(length)


def _is_sequence(tag: int) -> bool:
    """Implicit VR: whether the data dictionary knows ``tag`` as a sequence."""
    try:
        return str(dictionary_VR(tag)) == "SQ"
    except KeyError:
        return False


def _items(data: _Source, seq_end: int | None, explicit: bool, depth: int,
           outer_end: int | None) -> None:
    """A sequence's items: to ``seq_end`` (defined length) or its delimiter (undefined)."""
    limit = seq_end if seq_end is not None else outer_end
    while True:
        if seq_end is not None and data.tell() >= seq_end:
            return
        if limit is not None and data.tell() + 8 > limit:
            raise InvalidInstanceError(f"sequence runs past byte {limit}")
        tag = _tag(data.read(4))
        length = struct.unpack("<I", data.read(4))[0]
        if tag == _SEQ_END and seq_end is None:
            return
        if tag != _ITEM:
            raise InvalidInstanceError(f"expected an item tag, found {tag:08X}")
        if length == _UNDEFINED:
            _walk(data, limit, explicit, depth, _ITEM_END)
            continue
        item_end = data.tell() + length
        if limit is not None and item_end > limit:
            raise InvalidInstanceError(f"item of {length} bytes runs past byte {limit}")
        _walk(data, item_end, explicit, depth)


def _fragments(data: _Source, limit: int | None) -> None:
    """Items of encapsulated pixel data (fragments, not datasets) up to the sequence delimiter."""
    while True:
        tag = _tag(data.read(4))
        length = struct.unpack("<I", data.read(4))[0]
        if tag == _SEQ_END:
            return
        if tag != _ITEM or length == _UNDEFINED:
            raise InvalidInstanceError(f"expected a pixel data fragment, found {tag:08X}")
        if limit is not None and data.tell() + length > limit:
            raise InvalidInstanceError(f"fragment of {length} bytes runs past byte {limit}")
        data.skip(length)


def check_structure(fp: BinaryIO, offset: int, size: int, transfer_syntax: str, *,
                    max_inflated: int | None = None) -> int | None:
    """Raise :class:`InvalidInstanceError` unless the dataset from ``offset`` to ``size``
    is a complete sequence of elements with known VRs. Big-endian data are not walked.

    Parameters
    ----------
    fp:
        The file, open for reading in binary mode.
    offset, size:
        Where the dataset starts (after the file meta information) and the file's size.
    transfer_syntax:
        The dataset's Transfer Syntax UID.
    max_inflated:
        For Deflated Explicit VR Little Endian: the most bytes the dataset may inflate to. It is
        refused as soon as inflating passes that, before it is ever inflated whole.

    Returns
    -------
    int or None
        The length of native (not encapsulated) Pixel Data, for :func:`check_pixel_data`.
    """
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return None
    data: _Source
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        data = _Inflated(fp, offset, max_inflated)
    else:
        data = _Data(fp, offset, size)
    _walk(data, None, transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN, 0)
    return data.pixel_data_length


def check_pixel_data(ds: Dataset, pixel_data_length: int | None) -> None:
    """Raise :class:`InvalidInstanceError` if native Pixel Data of ``pixel_data_length`` bytes
    is shorter than the frames the Image Pixel module describes (PS3.3 C.7.6.3, PS3.5 8.1.1),
    or that module is missing. Longer data (trailing padding) are accepted."""
    if pixel_data_length is None:
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidInstanceError(f"Pixel Data without a valid Image Pixel module: {exc}") from None
    if min(rows, columns, samples, bits, frames) < 1:
        raise InvalidInstanceError("Pixel Data with an Image Pixel module of zero size")
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if pixel_data_length < expected:
        raise InvalidInstanceError(f"Pixel Data holds {pixel_data_length} bytes; {frames} frame(s) "
                                   f"of {rows} x {columns} x {samples} at {bits} bits need {expected}")
