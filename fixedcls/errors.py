"""User-facing errors.

A ``FixedclsError`` is raised for mistakes a user can fix from the command line or
config (a polytope that cannot hold K classes in d dimensions, an unknown backbone,
a loss that does not fit the head).  Its message is one line naming the problem and
the fix, so the CLI can print it without a traceback.  It subclasses ``ValueError``
so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["CheckpointWriteError", "FixedclsError"]


class FixedclsError(ValueError):
    """A configuration or input error with a one-line message naming the problem and the fix."""

    #: The status a command exits with (commands/cli.py): 2, a usage error the user fixes on the command line.
    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller built, so logs and CLIs stay tidy.
        super().__init__(" ".join(str(message).split()))


class CheckpointWriteError(FixedclsError):
    """Checkpoints of a run could not be written (a full disk, a lost mount): one line, exit status 1, since
    nothing on the command line was wrong.  `summary`: the run's summary (also in summary.json), whose best/*
    name only an epoch a checkpoint file holds."""

    exit_code = 1

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary
