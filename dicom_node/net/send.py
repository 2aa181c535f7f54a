"""Sending stored instances to a peer by C-STORE, exactly as stored (no transcoding)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from pynetdicom import AE

from dicom_node.errors import SendRefusedError
from dicom_node.settings import Destination
from dicom_node.status import stored

log = logging.getLogger(__name__)


def send_instances(files: Sequence[tuple[str, str, str, Path]], destination: Destination,
                   calling_ae: str, *, timeout_s: float = 30.0,
                   on_success: Callable[[str], None] | None = None,
                   tls_args: tuple[ssl.SSLContext, str] | None = None) -> None:
    """Send files to ``destination`` over one association.

    Parameters
    ----------
    files:
        ``(sop_instance_uid, sop_class_uid, transfer_syntax_uid, path)`` per instance.
    on_success:
        Called with the SOP Instance UID after each success, before the next send.
    tls_args:
        ``(ssl_context, server_hostname)`` for a DICOM TLS association
        (:func:`dicom_node.net.tls.client_tls_args`); ``None`` for plain TCP.

    Raises
    ------
    SendRefusedError
        The association failed, or a response was missing or not a success.
    """
    if not files:
        return
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    contexts = sorted({(f[1], f[2]) for f in files})
    if len(contexts) > 128:  # PS3.8 9.3.2.2: at most 128 presentation contexts
        raise ValueError("more than 128 distinct (SOP class, transfer syntax) pairs in one send")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls_args)
    if not assoc.is_established:
        reason = "association rejected or not reachable"
        raise SendRefusedError(str(destination), files[0][0],
                               reason + (" (or the TLS handshake failed)" if tls_args else ""))
    try:
        for sop_uid, _sop_class, _syntax, path in files:
            rsp = assoc.send_c_store(path)
            status = getattr(rsp, "Status", None)
            if status is None:
                raise SendRefusedError(str(destination), sop_uid, "no response (timeout or abort)")
            if not stored(status):
                raise SendRefusedError(str(destination), sop_uid, f"status 0x{status:04X}", status)
            if on_success is not None:
                on_success(sop_uid)
    finally:
        if assoc.is_established:
            assoc.release()
