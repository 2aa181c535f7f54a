"""Exceptions raised by the analysis package."""

from __future__ import annotations


class AnalysisError(Exception):
    """Base class of every error raised by :mod:`analysis`."""


class DatasetError(AnalysisError):
    """A training or evaluation dataset is missing or malformed."""


class CheckpointError(AnalysisError):
    """A checkpoint or weights file cannot be read or does not fit the model."""


class SlideUnreadableError(AnalysisError):
    """A slide cannot be opened or decoded."""


class NotABloodSmearError(AnalysisError):
    """The slide is not a peripheral blood smear (for example a tissue section routed by
    mistake): recognised early, before its cells are classified one by one."""
