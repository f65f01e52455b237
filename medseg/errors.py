"""One exception hierarchy for medseg: every message says what, where and how to fix it."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every error medseg raises on purpose.

    ``str(error)`` is a one-line cause and fix, fit to print to a user without a traceback; it
    names cases by their pseudonymous ids and may be tracked. ``local_detail`` says what the
    case is on this machine (a source file name): the command line shows it to the local user,
    and it never reaches tracking.
    """

    def __init__(self, message: str, *, local_detail: str | None = None) -> None:
        super().__init__(message)
        self.local_detail = local_detail


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
