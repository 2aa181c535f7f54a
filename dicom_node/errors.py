"""Exceptions raised by the DICOM node."""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error raised by :mod:`dicom_node`."""


class SettingsError(NodeError, ValueError):
    """A setting is missing, malformed or out of range."""


class InvalidInstanceError(NodeError):
    """A received dataset cannot be decoded or lacks valid identifying UIDs."""


class InvalidUIDError(InvalidInstanceError):
    """An identifying UID of a dataset is missing, malformed or disagrees with the request."""


class SOPClassMismatchError(NodeError):
    """The dataset's SOP Class differs from the one it was sent under."""


class StoreFullError(NodeError):
    """The store's file system has no room left (ENOSPC, EDQUOT)."""


class SendRefusedError(NodeError):
    """A destination refused an instance, or could not be reached.

    Parameters
    ----------
    destination:
        ``AE@host:port`` of the peer.
    sop_instance_uid:
        The instance that was being sent.
    reason:
        The failure: an association problem or the non-success status.
    status:
        The DIMSE status returned by the peer, when there was one.
    """

    def __init__(self, destination: str, sop_instance_uid: str, reason: str,
                 status: int | None = None) -> None:
        self.destination = destination
        self.sop_instance_uid = sop_instance_uid
        self.reason = reason
        self.status = status
        super().__init__(f"{destination} refused {sop_instance_uid}: {reason}")
