"""The states a job, an outbox row and a series' routing can be in.

They are ``StrEnum`` members whose values are the strings stored in the index and
reported by ``cytonode status --json``: a member compares equal to its string, is
written to the database as that string and serialises to JSON as that string, so
indexes written before these enums existed read the same.
"""

from __future__ import annotations

from enum import StrEnum


class JobStateValues(StrEnum):
    """State of an analysis job (``jobs.state``): pending -> queued -> running -> done | failed.

    A running job whose worker lost its lease goes back to pending (see
    :func:`dicom_node.jobs.routing.requeue_lost_jobs`).
    """

    PENDING = "pending"
    """Made by the router; not yet handed to the broker."""
    QUEUED = "queued"
    """Its task is on the broker's queue."""
    RUNNING = "running"
    """A worker holds it under a lease."""
    DONE = "done"
    """Finished; its results are stored (and queued for sending under the immediate policy)."""
    FAILED = "failed"
    """Finished with an error, or lost by its worker ``job_max_attempts`` times."""


class OutboxStateValues(StrEnum):
    """State of one (instance, destination) row of the outbox (``outbox.state``)."""

    PENDING = "pending"
    """Not delivered yet; tried again at ``next_attempt_at``."""
    SENT = "sent"
    """Delivered: the peer answered the C-STORE with a success status."""


class SeriesRoutingValues(StrEnum):
    """What the router decided for a series (``series.routing``); NULL while it is still receiving."""

    JOB = "job"
    """Stable, and a routing rule matched: one job was made."""
    IGNORED = "ignored"
    """Stable, and no routing rule matched."""
    LOCAL = "local"
    """A series the node created itself (its results); never routed."""
