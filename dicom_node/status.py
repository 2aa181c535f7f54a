"""DIMSE status values used by the node, named (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

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
