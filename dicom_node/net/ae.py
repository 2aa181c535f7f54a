"""The node's Application Entity: presentation contexts and peer policy.

Every change here must be mirrored in ``conformance/`` (a test compares them).
"""

from __future__ import annotations

import logging
import struct
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, cast

from pydicom import config as pydicom_config
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.net.receive import command_set_overflow, watch_data_set_file
from dicom_node.net.tls import TLSAssociationServer
from dicom_node.settings import Settings
from dicom_node.store.files import Store

log = logging.getLogger(__name__)

#: Storage SOP classes the SCP accepts (PS3.4 Annex B.5), name -> UID.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "VLWholeSlideMicroscopyImageStorage": "1.2.840.10008.5.1.4.1.1.77.1.6",
    "VLMicroscopicImageStorage": "1.2.840.10008.5.1.4.1.1.77.1.2",
    "VLSlideCoordinatesMicroscopicImageStorage": "1.2.840.10008.5.1.4.1.1.77.1.3",
    "MicroscopyBulkSimpleAnnotationsStorage": "1.2.840.10008.5.1.4.1.1.91.1",
    "SegmentationStorage": "1.2.840.10008.5.1.4.1.1.66.4",
    "LabelMapSegmentationStorage": "1.2.840.10008.5.1.4.1.1.66.7",
    "ParametricMapStorage": "1.2.840.10008.5.1.4.1.1.30",
    "BasicTextSRStorage": "1.2.840.10008.5.1.4.1.1.88.11",
    "EnhancedSRStorage": "1.2.840.10008.5.1.4.1.1.88.22",
    "ComprehensiveSRStorage": "1.2.840.10008.5.1.4.1.1.88.33",
    "Comprehensive3DSRStorage": "1.2.840.10008.5.1.4.1.1.88.34",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameTrueColorSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.4",
    "EncapsulatedPDFStorage": "1.2.840.10008.5.1.4.1.1.104.1",
}

#: Transfer syntaxes accepted for every storage class, in the order preferred
#: when a sender offers several (PS3.5 Annex A). Data are stored as received.
TRANSFER_SYNTAXES: dict[str, str] = {
    "ExplicitVRLittleEndian": "1.2.840.10008.1.2.1",
    "ImplicitVRLittleEndian": "1.2.840.10008.1.2",
    "DeflatedExplicitVRLittleEndian": "1.2.840.10008.1.2.1.99",
    "JPEGBaseline8Bit": "1.2.840.10008.1.2.4.50",
    "JPEGExtended12Bit": "1.2.840.10008.1.2.4.51",
    "JPEGLossless": "1.2.840.10008.1.2.4.57",
    "JPEGLosslessSV1": "1.2.840.10008.1.2.4.70",
    "JPEGLSLossless": "1.2.840.10008.1.2.4.80",
    "JPEGLSNearLossless": "1.2.840.10008.1.2.4.81",
    "JPEG2000Lossless": "1.2.840.10008.1.2.4.90",
    "JPEG2000": "1.2.840.10008.1.2.4.91",
    "HTJ2KLossless": "1.2.840.10008.1.2.4.201",
    "HTJ2KLosslessRPCL": "1.2.840.10008.1.2.4.202",
    "HTJ2K": "1.2.840.10008.1.2.4.203",
    "RLELossless": "1.2.840.10008.1.2.5",
}

VERIFICATION = "1.2.840.10008.1.1"

#: Query/Retrieve (PS3.4 Annex C) and Verification accept only the uncompressed syntaxes.
QR_TRANSFER_SYNTAXES = [TRANSFER_SYNTAXES["ExplicitVRLittleEndian"],
                        TRANSFER_SYNTAXES["ImplicitVRLittleEndian"]]

#: Verification accepts only the uncompressed syntaxes.
VERIFICATION_TRANSFER_SYNTAXES = [TRANSFER_SYNTAXES["ExplicitVRLittleEndian"],
                                  TRANSFER_SYNTAXES["ImplicitVRLittleEndian"]]


#: A-ASSOCIATE-RJ parameters for "too many associations" (PS3.8 9.3.4, Table 9-21):
#: result rejected-transient, source service-provider (presentation), local limit exceeded.
REJECT_TRANSIENT = 0x02
SOURCE_PRESENTATION = 0x03
LOCAL_LIMIT_EXCEEDED = 0x02

#: pynetdicom's own limit on acceptor threads (connections, with or without an association) is
#: this many times ``max_associations``; it only bounds the threads that silent, open
#: connections can hold until the ACSE timeout (PS3.8 9.1.4, ARTIM) closes them.
CONNECTIONS_PER_ASSOCIATION = 4


#: pynetdicom modules whose errors (often with a traceback) only ever describe a PDU, a string
#: in it, the UIDs a peer proposed or a state-machine event that a peer sent.
PEER_PDU_LOGGERS = ("pynetdicom.pdu", "pynetdicom.pdu_items", "pynetdicom.utils", "pynetdicom.fsm",
                    "pynetdicom.presentation")


class _PeerPDUErrors(logging.Filter):
    """Drops pynetdicom's reports, one or more per PDU and often with a traceback, about bytes
    a peer sent that are not a valid PDU. :func:`handle_conn_close` logs one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_read_pdu_data"


_PEER_PDU_ERRORS = _PeerPDUErrors()


class _PeerMessageReports(logging.Filter):
    """Drops pynetdicom's reports about DIMSE messages a peer sent that name no service the
    node offers, or that it did not expect (a response where a request belongs)."""

    PREFIXES = ("Received unexpected ", "No supported service class available")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


_PEER_MESSAGE_REPORTS = _PeerMessageReports()


class _PeerMessageTracebacks(logging.Filter):
    """Keeps pynetdicom's one line "Received an invalid DIMSE message" (it then aborts the
    association) and drops the traceback it logs after it: the error is in the peer's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "receive_primitive" and record.exc_info)


_PEER_MESSAGE_TRACEBACKS = _PeerMessageTracebacks()


def configure_pynetdicom(settings: Settings) -> None:
    """Set pynetdicom's process-wide flags and loggers. Called once, at node start-up.

    Received datasets are written by pynetdicom straight to a file in the data
    directory's ``tmp/`` (chunked receive), so the store can rename that file
    into place without reading or copying it.

    pynetdicom logs each association at INFO and each malformed PDU at ERROR, which lets any
    peer flood the log; unless debug logging is on, only its warnings and errors about our
    own side are kept, and the node logs one line per association or dropped connection.
    """
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    tempfile.tempdir = str(settings.tmp_dir)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # pynetdicom's own handlers only log each PDU and DIMSE message (INFO, DEBUG), and
        # raise, logging a traceback, on a malformed one; pydicom warns about every invalid
        # value a peer sends (data are stored as received, PS3.2 statement 2.2.1.4.3).
        _config.LOG_HANDLER_LEVEL = "none"
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        for name in PEER_PDU_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        for name, peer_filter in (("pynetdicom.dul", _PEER_PDU_ERRORS),
                                  ("pynetdicom.association", _PEER_MESSAGE_REPORTS),
                                  ("pynetdicom.dimse", _PEER_MESSAGE_TRACEBACKS)):
            logging.getLogger(name).addFilter(peer_filter)  # once: addFilter skips a repeat


class AssociationLimit:
    """At most ``maximum`` associations at once.

    An association holds its place from its A-ASSOCIATE-RQ until it is released, aborted or
    rejected, or its connection closes. A connection that closes, or sends no valid request,
    never counts (pynetdicom's own count holds every connection until the ACSE timeout).
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self._lock = threading.Lock()
        self._held: set[Any] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def acquire(self, assoc: Any) -> bool:
        """Take a place for ``assoc``; ``False`` when all are taken."""
        with self._lock:
            # An association thread that died without closing its transport gives its place back.
            self._held = {a for a in self._held if a.is_alive()}
            if len(self._held) >= self.maximum:
                return False
            self._held.add(assoc)
            return True

    def release(self, assoc: Any) -> None:
        with self._lock:
            self._held.discard(assoc)


def handle_requested(event: evt.Event, limit: AssociationLimit) -> None:
    """A-ASSOCIATE-RQ received: take a place, or reject (transient, local limit exceeded)."""
    assoc: Any = event.assoc
    if limit.acquire(assoc):
        return
    # What pynetdicom's ACSE does when its own limit is reached, before negotiation starts.
    assoc.is_rejected = True
    assoc.acse.send_reject(REJECT_TRANSIENT, SOURCE_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def handle_established(event: evt.Event) -> None:
    """One line per accepted association, with the calling AE title (the audit trail)."""
    assoc: Any = event.assoc
    log.info("association from %s (%s:%d) established", assoc.requestor.ae_title.strip(),
             assoc.requestor.address, assoc.requestor.port)


def handle_ended(event: evt.Event, limit: AssociationLimit) -> None:
    """Released, aborted or rejected: the association no longer counts against the limit."""
    assoc: Any = event.assoc
    limit.release(assoc)
    if event.event is evt.EVT_REJECTED:
        rj = assoc.acceptor.primitive
        log.warning("association from %s (%s:%d) rejected: %s", assoc.requestor.ae_title.strip(),
                    assoc.requestor.address, assoc.requestor.port,
                    rj.reason_str if rj is not None else "no reason given")


def handle_conn_close(event: evt.Event, limit: AssociationLimit) -> None:
    """The transport connection closed (for any reason, PS3.8 9.2 Evt17).

    Gives back the association's place, deletes the temporary file of a C-STORE whose data set
    was still arriving, and ends at once a connection that never sent an A-ASSOCIATE-RQ.
    """
    assoc: Any = event.assoc
    limit.release(assoc)
    if not assoc.is_acceptor:
        return
    host, port = event.address  # type: ignore[attr-defined]
    address = f"{host}:{port}"
    partial = _discard_partial_dataset(assoc)
    refusal = getattr(assoc.dul.socket, "refusal", None)  # set by PDULimitSocket
    if assoc.requestor.primitive is None:
        # The association thread waits up to the ACSE timeout for an A-ASSOCIATE-RQ that can no
        # longer come, holding a place among pynetdicom's active associations: wake it now.
        assoc.dul.to_user_queue.put(None)
        log.warning("connection from %s closed without an association request (%s)", address,
                    f"aborted: it {refusal}" if refusal else "dropped, or not DICOM")
    elif refusal is not None:
        log.warning("association from %s (%s) aborted: it %s%s", assoc.requestor.ae_title.strip(),
                    address, refusal,
                    f"; discarded the partial data set of {partial}" if partial else "")
    elif partial is not None:
        log.warning("association from %s (%s) ended during a C-STORE; discarded the partial "
                    "data set of %s", assoc.requestor.ae_title.strip(), address, partial)


def _discard_partial_dataset(assoc: Any) -> str | None:
    """Delete the chunked-receive file of a C-STORE cut off mid-transfer; return its SOP Instance UID.

    pynetdicom deletes that file only after the handler has run, so a data set whose transfer
    never finished would stay in ``tmp/`` until the next start. Runs on the DUL thread, the one
    that writes the file, so nothing writes to it any more.
    """
    message: Any = getattr(assoc.dimse, "message", None)
    part = getattr(message, "_data_set_file", None)  # STORE_RECV_CHUNKED_DATASET's temp file
    if part is None:
        return None
    sop_instance_uid = str(getattr(message.command_set, "AffectedSOPInstanceUID", "") or "?")
    part.close()
    try:
        Path(part.name).unlink(missing_ok=True)
    except OSError as exc:
        log.error("could not delete the partial data set %s: %s", part.name, exc)
    message._data_set_file = None
    message._data_set_path = None
    return sop_instance_uid


#: The largest PDU other than a P-DATA-TF that the node reads (PS3.8 9.3). An A-ASSOCIATE-RQ
#: proposing 128 presentation contexts of 20 transfer syntaxes each is about 180 KB; a user
#: identity item is at most 64 KiB.
MAX_ASSOCIATION_PDU = 1024 * 1024

#: PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ 0x01 ... A-ABORT 0x07) and P-DATA-TF.
PDU_TYPES = range(0x01, 0x08)
P_DATA_TF = 0x04
A_ASSOCIATE_RQ = 0x01

#: States of pynetdicom's state machine (PS3.8 Table 9-10) in which P-DATA-TF may arrive:
#: association established (Sta6) and the release states.
_DATA_TRANSFER_STATES = frozenset(f"Sta{n}" for n in range(6, 13))

#: A-ABORT source and reasons (PS3.8 Table 9-26): service-provider; unrecognized PDU,
#: invalid PDU parameter value.
ABORT_SOURCE_PROVIDER = 0x02
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_INVALID_PDU_PARAMETER = 0x06


def _bad_association_request(body: bytes) -> str | None:
    """What makes an A-ASSOCIATE-RQ ``body`` unacceptable before pynetdicom decodes it, or ``None``.

    PS3.8 9.3.2: 68 fixed bytes, then items; a presentation context item (type 0x20) carries
    its ID (odd, 1-255) in its fifth byte, then one abstract syntax sub-item (0x30) and one or
    more transfer syntax sub-items (0x40). pynetdicom raises on an even ID, or on a context
    without an abstract syntax, on its DUL or association thread, which then dies with a
    traceback instead of refusing the association.
    """
    offset = 68
    while offset + 4 <= len(body):
        item_type = body[offset]
        length = int.from_bytes(body[offset + 2:offset + 4], "big")
        end = min(len(body), offset + 4 + length)
        if item_type == 0x20:
            if length < 4 or body[offset + 4] % 2 == 0:
                ident = body[offset + 4] if length >= 1 else "none"
                return f"proposed presentation context ID {ident} (must be odd, 1-255)"
            kinds: list[int] = []
            sub = offset + 8
            while sub + 4 <= end:
                sub_length = int.from_bytes(body[sub + 2:sub + 4], "big")
                if sub_length == 0 and body[sub] in (0x30, 0x40):
                    return "proposed a presentation context with an empty syntax"
                kinds.append(body[sub])
                sub += 4 + sub_length
            if kinds.count(0x30) != 1 or 0x40 not in kinds:
                return (f"proposed presentation context {body[offset + 4]} without one abstract "
                        f"syntax and at least one transfer syntax")
        offset += 4 + length
    return None


class PDURefusedError(OSError):
    """A peer's PDU header announced an unknown PDU type or more bytes than the node reads."""


class PDULimitSocket(AssociationSocket):
    """An acceptor's socket that refuses a PDU from its header when it is too large to read
    or of an unknown type.

    pynetdicom's DUL (``DULServiceProvider._read_pdu_data``) reads each PDU as ``recv(6)`` (type,
    reserved byte, 32-bit length; PS3.8 9.3.1) and then ``recv(length)`` into memory, whatever
    the length. Here each header is checked before its body is read: a P-DATA-TF longer than the
    Maximum Length Received the node announced (``CYTONODE_MAX_PDU``, PS3.8 D.1.1), or any other
    PDU longer than :data:`MAX_ASSOCIATION_PDU`, is answered by an A-ABORT (service-provider,
    invalid PDU parameter value; unrecognized PDU for an unknown type) and the read fails. The DUL then handles a closed connection
    (Evt17: AA-4 or AA-5 close the socket and trigger ``EVT_CONN_CLOSE``), so nothing more of
    the PDU is read.

    Installed by :class:`NodeRequestHandler` on every accepted connection.
    """

    _body_due = False  # the next recv() reads the body of a PDU whose header was returned
    _pdu_type = 0  # the type of that PDU
    #: Why the node closed the connection, for the one line :func:`handle_conn_close` logs.
    refusal: str | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        if self.refusal is not None:
            # The DUL may read again before it handles the closed connection: nothing more.
            return bytearray()
        if self._body_due:
            self._body_due = False
            body = self._recv_body(nr_bytes)
            if self._pdu_type == A_ASSOCIATE_RQ:
                bad = _bad_association_request(body)
                if bad is not None:
                    self._refuse(ABORT_INVALID_PDU_PARAMETER, bad)
            return body
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type not in PDU_TYPES:
                # pynetdicom would answer A-ABORT and keep reading (6 bytes at a time) until the
                # ARTIM timeout; a peer sending a stream of garbage gets its connection closed.
                self._refuse(ABORT_UNRECOGNIZED_PDU, f"sent a PDU of unknown type 0x{pdu_type:02X}")
            limit = self._limit(pdu_type)
            if limit and length > limit:
                what = "a P-DATA-TF" if pdu_type == P_DATA_TF else f"a PDU of type 0x{pdu_type:02X}"
                setting = "CYTONODE_MAX_PDU" if pdu_type == P_DATA_TF else "the limit"
                self._refuse(ABORT_INVALID_PDU_PARAMETER,
                             f"announced {what} of {length} bytes, more than {setting} ({limit})")
            self._body_due, self._pdu_type = True, pdu_type
        return data

    def _recv_body(self, nr_bytes: int) -> bytearray:
        """Read a PDU body into one buffer with ``recv_into`` in chunks of up to 1 MiB.

        pynetdicom's ``recv`` reads 4 KiB per call and extends a ``bytearray``: for a 4 MiB
        P-DATA that is a thousand Python iterations and copies; the ingest bench measured the
        receive path as where the node loses to storescp. Same contract: fewer bytes than asked
        only when the peer closed the connection."""
        sock = self.socket
        if sock is None:
            return bytearray()
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        done = 0
        try:
            while done < nr_bytes:
                n = sock.recv_into(view[done:], min(nr_bytes - done, 1 << 20))
                if n == 0:
                    break
                done += n
        finally:
            view.release()
        if done < nr_bytes:
            del buffer[done:]
        return buffer

    def _limit(self, pdu_type: int) -> int:
        """The largest PDU of ``pdu_type`` the node reads now; 0 for no limit."""
        state = self.assoc.dul.state_machine.current_state
        if pdu_type == P_DATA_TF and state in _DATA_TRANSFER_STATES:
            return int(self.assoc.acceptor.maximum_length or 0)
        return MAX_ASSOCIATION_PDU

    def _refuse(self, reason: int, refusal: str) -> None:
        """Send an A-ABORT (best effort, outside the state machine) and fail the read."""
        self.refusal = refusal
        abort = A_ABORT_RQ()
        abort.source = ABORT_SOURCE_PROVIDER
        abort.reason_diagnostic = reason
        try:
            if self.socket is not None:
                self.socket.sendall(abort.encode())
        except OSError:
            pass  # the peer has gone; the DUL closes our side either way
        raise PDURefusedError(refusal)


class _CommandSetTooLargeError(Exception):
    """A peer's command set fragments add up to more than the node reads."""


def _guard_dimse_decoding(assoc: Any, store: Store) -> None:
    """Abort, rather than lose the DUL thread, when a peer's DIMSE message cannot be decoded or its
    command set grows too large; check free space while a C-STORE's data set is written.

    pynetdicom decodes P-DATA fragments into a DIMSE message on the DUL thread
    (``DIMSEServiceProvider.receive_primitive``); some malformed command sets raise there (a
    command set without Command Data Set Type: ``AttributeError``), which kills the DUL thread
    with a traceback and leaves the connection open. Here that is handled as an invalid PDU
    (Evt19: AA-8 sends an A-ABORT and ends the association, PS3.8 9.2) and the connection closed.
    So is a command set that would pass :data:`dicom_node.net.receive.MAX_COMMAND_SET_BYTES`
    (pynetdicom buffers any number of command fragments). A data set is written through a
    :class:`dicom_node.net.receive.ReceivedDataSetFile`, which drops it once free space runs short.
    """
    receive = assoc.dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        try:
            overflow = command_set_overflow(assoc.dimse.message, primitive)
            if overflow is not None:
                raise _CommandSetTooLargeError(overflow)
            receive(primitive)
            if assoc.dimse.message is not None:
                watch_data_set_file(assoc.dimse.message, store)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises whatever the bytes cause
            _discard_partial_dataset(assoc)
            assoc.dimse.message = None
            socket = assoc.dul.socket
            if isinstance(socket, PDULimitSocket) and socket.refusal is None:
                # Also makes the socket read as closed: AA-8's ARTIM wait ends at once.
                socket.refusal = (str(exc) if isinstance(exc, _CommandSetTooLargeError) else
                                  f"sent a DIMSE message that cannot be decoded "
                                  f"({exc.__class__.__name__}: {exc})")
            assoc.dul.event_queue.put("Evt19")

    assoc.dimse.receive_primitive = receive_primitive


class NodeRequestHandler(RequestHandler):
    """pynetdicom's connection handler, with :class:`PDULimitSocket` as the connection's socket
    and DIMSE messages guarded as they arrive (:func:`_guard_dimse_decoding`).

    ``RequestHandler._create_association`` builds a plain ``AssociationSocket`` around the
    accepted connection (signalling Evt5, "transport connection indication", as it does); its
    class is switched rather than a second socket built, which would signal a second connection.
    """

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = PDULimitSocket
        _guard_dimse_decoding(assoc, cast("NodeAE", self.ae).store)
        return assoc


class NodeAE(AE):
    """The node's AE: its servers accept connections through :class:`NodeRequestHandler`.

    Parameters
    ----------
    ae_title:
        The node's AE title.
    store:
        The store received data sets are written for (its free space is checked as they arrive).
    """

    def __init__(self, ae_title: str, store: Store) -> None:
        super().__init__(ae_title=ae_title)
        self.store = store

    def make_server(self, address: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("request_handler", NodeRequestHandler)
        # TLS (dicom_node/net/tls.py): the handshake runs on the connection's thread, not accept()'s.
        if kwargs.get("server_class") is ThreadedAssociationServer:
            kwargs["server_class"] = TLSAssociationServer
        return super().make_server(address, *args, **kwargs)


def make_ae(settings: Settings, store: Store) -> tuple[AE, list[Any]]:
    """Build the SCP AE and its event handlers (not yet started).

    Returns
    -------
    tuple
        The AE and the ``evt_handlers`` list for ``start_server``.
    """
    from dicom_node.net.handlers import handle_echo, handle_store
    from dicom_node.net.qr import QR_SOP_CLASSES, qr_handlers

    ae = NodeAE(settings.ae_title, store)
    limit = AssociationLimit(settings.max_associations)
    ae.maximum_associations = CONNECTIONS_PER_ASSOCIATION * settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.network_timeout = settings.network_timeout_s
    ae.acse_timeout = settings.network_timeout_s
    ae.dimse_timeout = settings.network_timeout_s
    ae.require_called_aet = settings.require_called_ae
    if settings.allowed_aes:
        ae.require_calling_aet = list(settings.allowed_aes)
    else:
        log.warning("CYTONODE_ALLOWED_AES is empty: any calling AE may associate")
    ae.add_supported_context(VERIFICATION, VERIFICATION_TRANSFER_SYNTAXES)
    syntaxes = list(TRANSFER_SYNTAXES.values())
    for uid in STORAGE_SOP_CLASSES.values():
        # SCP/SCU role selection (PS3.7 D.3.3.4): a C-GET requestor takes the SCP role.
        ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
    for uid in QR_SOP_CLASSES.values():
        ae.add_supported_context(uid, QR_TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_REQUESTED, handle_requested, [limit]), (evt.EVT_ESTABLISHED, handle_established),
                (evt.EVT_RELEASED, handle_ended, [limit]), (evt.EVT_ABORTED, handle_ended, [limit]),
                (evt.EVT_REJECTED, handle_ended, [limit]),
                (evt.EVT_CONN_CLOSE, handle_conn_close, [limit]),
                (evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [store]),
                *qr_handlers(store, settings)]
    return ae, handlers
