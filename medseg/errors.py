"""One exception hierarchy for medseg: every message says what, where and how to fix it."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every error medseg raises on purpose.

    ``str(error)`` is a one-line cause and fix, fit to print to a user without a traceback.
    """


class ConfigError(MedsegError):
    """A workflow or pipeline file, or a parameter, is invalid."""


class DataError(MedsegError):
    """Input data is missing, unreadable or inconsistent."""


class StageError(MedsegError):
    """A pipeline stage failed while running."""


class CacheError(MedsegError):
    """The stage cache in the workspace is damaged or cannot be written."""


class TrackingError(MedsegError):
    """The MLflow tracking backend could not be reached or refused a request."""
