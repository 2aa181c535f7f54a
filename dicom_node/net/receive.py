"""Limits on a DIMSE message while its P-DATA fragments arrive (PS3.8 E.2), before pynetdicom
has the whole message: the size of its command set, and free space while its data set is written.

pynetdicom's ``DIMSEMessage.decode_msg`` appends each command fragment to a buffer in memory and,
with chunked receive, each data set fragment to a file in ``DATA_DIR/tmp``; it checks neither. The
node's DUL wrapper (``dicom_node.net.ae``) calls :func:`command_set_overflow` before each P-DATA and
:func:`watch_data_set_file` after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_node.errors import StoreFullError
from dicom_node.store.files import Store

#: The largest command set the node reads (PS3.7 9.3, 10.3: a dozen elements; a C-FIND or C-MOVE
#: request's is a few hundred bytes). A peer that sends more fragments is aborted.
MAX_COMMAND_SET_BYTES = 64 * 1024

#: How many data set bytes are written between two checks of free space (the first fragment is
#: always checked): the default Maximum PDU Length, so a data set may take at most about twice
#: this below the reserve. A check is one ``statvfs``; at every MiB it took 1 % of the receive
#: path's samples in the ingest profile (docs/benchmarks.md).
FREE_SPACE_CHECK_BYTES = 4 * 1024 * 1024


def command_set_overflow(message: Any, primitive: Any) -> str | None:
    """Why ``primitive`` (a P-DATA) would take the command set of the DIMSE message being received
    (``message``, ``None`` before its first fragment) past :data:`MAX_COMMAND_SET_BYTES`, or
    ``None`` if it does not.

    Parameters
    ----------
    message:
        pynetdicom's ``DIMSEMessage`` that holds the fragments received so far, or ``None``.
    primitive:
        The P-DATA primitive about to be decoded.
    """
    # PS3.8 E.2: bit 0 of a PDV's message control header marks a command fragment.
    incoming = sum(len(data) - 1 for _, data in primitive.presentation_data_value_list
                   if data and data[0] & 1)
    if not incoming:
        return None
    received = message.encoded_command_set.tell() if message is not None else 0
    if received + incoming <= MAX_COMMAND_SET_BYTES:
        return None
    return (f"sent a command set of more than {MAX_COMMAND_SET_BYTES} bytes "
            f"({received + incoming} in its fragments so far)")


class ReceivedDataSetFile:
    """The file a C-STORE's data set is written to as its fragments arrive, with free space checked.

    Stands in for pynetdicom's temporary file (``DIMSEMessage._data_set_file``; pynetdicom calls
    ``write``, ``file.flush``, ``close`` and ``name``). Every :data:`FREE_SPACE_CHECK_BYTES` the
    store checks that writing leaves ``CYTONODE_MIN_FREE_BYTES`` free; once it does not, the
    partial file is deleted at once and the rest of the data set is read and dropped, and
    :attr:`refusal` says why: :func:`dicom_node.net.handlers.handle_store` answers Out of Resources
    (0xA700) instead of storing it.

    Parameters
    ----------
    part:
        pynetdicom's open temporary file.
    store:
        The store whose file system the data set is written to.
    """

    def __init__(self, part: Any, store: Store) -> None:
        self._part = part
        self._store = store
        self.name: str = part.name
        #: Why the data set was dropped while it arrived (``None``: it was not).
        self.refusal: str | None = None
        self._unchecked = FREE_SPACE_CHECK_BYTES  # bytes written since the last check

    @property
    def file(self) -> ReceivedDataSetFile:
        """pynetdicom flushes ``file`` after each fragment."""
        return self

    def write(self, data: bytes) -> int:
        if self.refusal is None:
            self._unchecked += len(data)
            if self._unchecked >= FREE_SPACE_CHECK_BYTES:
                self._unchecked = 0
                try:
                    self._store.check_space(len(data))
                except StoreFullError as exc:
                    self.discard(f"{exc} while its data set arrived")
            if self.refusal is None:
                self._part.write(data)
        return len(data)

    def flush(self) -> None:
        if self.refusal is None:
            self._part.file.flush()

    def close(self) -> None:
        self._part.close()

    def discard(self, refusal: str) -> None:
        """Delete the partial file now and drop whatever more arrives."""
        self.refusal = refusal
        self._part.close()
        Path(self.name).unlink(missing_ok=True)


def watch_data_set_file(message: Any, store: Store) -> None:
    """Put a :class:`ReceivedDataSetFile` in place of the temporary file pynetdicom opened for
    ``message``'s data set, if it has just opened one (at the last command fragment)."""
    part = getattr(message, "_data_set_file", None)
    if part is not None and not isinstance(part, ReceivedDataSetFile):
        message._data_set_file = ReceivedDataSetFile(part, store)


def data_set_refusal(request: Any) -> str | None:
    """Why the data set of a received C-STORE request was dropped as it arrived, or ``None``."""
    part = getattr(request, "_dataset_file", None)
    return part.refusal if isinstance(part, ReceivedDataSetFile) else None
