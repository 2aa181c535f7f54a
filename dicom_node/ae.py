"""The node's Application Entity: presentation contexts and peer policy.

Every change here must be mirrored in ``conformance/`` (a test compares them).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from pynetdicom import AE, _config, evt

from dicom_node.settings import Settings
from dicom_node.store import Store

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


def configure_pynetdicom(settings: Settings) -> None:
    """Set pynetdicom's process-wide flags. Called once, at node start-up.

    Received datasets are written by pynetdicom straight to a file in the data
    directory's ``tmp/`` (chunked receive), so the store can rename that file
    into place without reading or copying it.
    """
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    tempfile.tempdir = str(settings.tmp_dir)


def make_ae(settings: Settings, store: Store) -> tuple[AE, list[Any]]:
    """Build the SCP AE and its event handlers (not yet started).

    Returns
    -------
    tuple
        The AE and the ``evt_handlers`` list for ``start_server``.
    """
    from dicom_node.handlers import handle_echo, handle_store
    from dicom_node.qr import QR_SOP_CLASSES, qr_handlers

    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
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
    handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [store]),
                *qr_handlers(store, settings)]
    return ae, handlers
