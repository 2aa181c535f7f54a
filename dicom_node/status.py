"""Every DIMSE status the node returns, and the reason codes of its STOW-RS responses, named.

C-STORE and C-ECHO (PS3.4 Annex B.2.3, PS3.7 Annex C), C-FIND, C-MOVE and C-GET (PS3.4 Annex C:
C.4.1.1.4, C.4.2.1.5, C.4.3.1.4), and the Failure Reason (0008,1197) and Warning Reason
(0008,1196) of a STOW-RS response (PS3.18 10.5.3, which takes its codes from PS3.4 B.2.3 and
PS3.7 Annex C). Never write one of these as a bare number.
"""

from __future__ import annotations

import enum


class StatusValues(enum.IntEnum):
    """Statuses of C-STORE and C-ECHO responses that the node sends."""

    SUCCESS = 0x0000
    # PS3.4 B.2.3: Refused, out of resources (A7xx).
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: Error, data set does not match SOP Class (A9xx).
    SOP_CLASS_MISMATCH = 0xA900
    # PS3.4 B.2.3: Error, cannot understand (Cxxx).
    CANNOT_UNDERSTAND = 0xC000
    # PS3.4 B.2.3: Cxxx (cannot understand); our sub-code for identifying UIDs that are
    # missing, malformed or differ from the C-STORE request.
    INVALID_UIDS = 0xC001
    # PS3.7 Annex C: processing failure, for errors the node did not foresee.
    PROCESSING_FAILURE = 0x0110


class QueryRetrieveStatusValues(enum.IntEnum):
    """Statuses of C-FIND, C-MOVE and C-GET responses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)."""

    # PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4: Success (matching or sub-operations complete).
    SUCCESS = 0x0000
    # PS3.4 C.4.1.1.4: Pending, matches are continuing (every optional key supported); C.4.2.1.5,
    # C.4.3.1.4: Pending, sub-operations are continuing.
    PENDING = 0xFF00
    # PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4: Cancel, terminated due to a C-CANCEL request.
    CANCEL = 0xFE00
    # C.4.2.1.5: sub-operations complete, one or more failures or warnings.
    SUBOPERATIONS_WARNING = 0xB000
    # PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4: Refused, out of resources (A700; A701/A702 in C-MOVE
    # and C-GET name the sub-operations, which the node does not distinguish).
    OUT_OF_RESOURCES = 0xA700
    # C.4.2.1.5: refused, move destination unknown.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    # C.4.1.1.4: identifier does not match SOP class (bad or missing Query/Retrieve Level).
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # C.4.1.1.4: unable to process (identifier cannot be decoded, malformed matching value).
    UNABLE_TO_PROCESS = 0xC000


class StowFailureReasonValues(enum.IntEnum):
    """Failure Reason (0008,1197) of an instance a STOW-RS request could not store (PS3.18 10.5.3)."""

    # PS3.7 Annex C: processing failure (an error the node did not foresee).
    PROCESSING_FAILURE = 0x0110
    # PS3.7 Annex C: no such SOP Class (the node does not store it, or the part is not DICOM).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    # PS3.4 B.2.3: Refused, out of resources.
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: Error, data set does not match SOP Class.
    SOP_CLASS_MISMATCH = 0xA900
    # PS3.4 B.2.3: Error, cannot understand.
    CANNOT_UNDERSTAND = 0xC000
    # PS3.18 10.5.3: Referenced Transfer Syntax not supported.
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    # PS3.18 10.5.3: the instance's Study Instance UID is not the one in the request's path.
    STUDY_UID_MISMATCH = 0xC409


class StowWarningReasonValues(enum.IntEnum):
    """Warning Reason (0008,1196) of an instance a STOW-RS request stored with a warning."""

    # PS3.4 B.2.3 (B007), PS3.18 10.5.3: data set does not match SOP Class; the node sends it when
    # a different instance with the same SOP Instance UID was already stored and kept.
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


def stored(status: int) -> bool:
    """Whether a peer's C-STORE response status means it kept the instance: success, or a
    warning (PS3.4 B.2.3: coercion B000, elements discarded B006, data set does not match SOP
    class B007; every Bxxx status is a warning)."""
    return status == StatusValues.SUCCESS or (status >> 12) == 0xB
