"""TLS for both ports: the DICOM SCP and outgoing associations (PS3.15 B.9, BCP 195 TLS Secure
Transport Connection Profile), and HTTPS for the viewer and DICOMweb.

Everything comes from four settings: ``tls_certificate`` and ``tls_key`` (the node's own
certificate chain and private key, PEM; setting them switches TLS on for both ports),
``tls_ca`` (PEM bundle of the CAs whose certificates the node trusts, for client certificates
and for the destinations marked ``+tls``) and ``tls_require_client_certificate``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.errors import SettingsError
from dicom_node.settings import Destination, Settings

log = logging.getLogger(__name__)


class _ServerContext(ssl.SSLContext):
    """An ``SSLContext`` whose server-side sockets do their handshake on the connection's own
    thread (see :class:`TLSAssociationServer`), not in ``accept()``.

    pynetdicom's ``AssociationServer.get_request`` (and cheroot's connection manager) wrap
    sockets on the one thread that accepts every connection, with the handshake run at once:
    a peer that connects and sends nothing would stop all others from connecting.
    """

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect and not server_side,
                                   *args, **kwargs)


def _load(context: ssl.SSLContext, settings: Settings) -> ssl.SSLContext:
    """TLS 1.2 or newer, the node's own certificate (if it has one) and the CAs of ``tls_ca``."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195 (RFC 9325): TLS 1.2 or newer
    try:
        if settings.tls_certificate:
            context.load_cert_chain(settings.tls_certificate, settings.tls_key)
        if settings.tls_ca:
            context.load_verify_locations(cafile=settings.tls_ca)
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"TLS: cannot load tls_certificate {settings.tls_certificate!r}, tls_key "
                            f"{settings.tls_key!r} or tls_ca {settings.tls_ca!r}: {exc}") from None
    return context


def http_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTPS context (``None`` when TLS is off). Browsers are not asked for certificates:
    the viewer and DICOMweb authenticate with a session or a bearer token."""
    if not settings.tls_enabled:
        return None
    return _load(_ServerContext(ssl.PROTOCOL_TLS_SERVER), settings)


def dicom_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's context (``None`` when TLS is off): the HTTPS one, but a client certificate
    signed by a CA in ``tls_ca`` is required with ``tls_require_client_certificate``."""
    context = http_server_context(settings)
    if context is not None and settings.tls_require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_args(settings: Settings, destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate`` to ``destination`` (``None`` unless it is marked ``+tls``).

    The peer's certificate must be signed by a CA in ``tls_ca`` (the system's trusted CAs when
    that is empty) and name ``destination.host``; the node presents its own certificate, if it
    has one, for peers that require client certificates.
    """
    if not destination.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and host name
    if not settings.tls_ca:
        context.load_default_certs()
    return _load(context, settings), destination.host


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake done on the connection's thread,
    bounded by the network timeout, and a failed handshake logged in one line."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            timeout = request.gettimeout()
            try:
                request.settimeout(self.ae.network_timeout)
                request.do_handshake()
                request.settimeout(timeout)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc.__class__.__name__
                log.warning("connection from %s:%d closed: TLS handshake failed (%s)",
                            client_address[0], client_address[1], reason)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)
