"""User-facing errors.

A ``FixedclsError`` is raised for mistakes a user can fix from the command line or
config (a polytope that cannot hold K classes in d dimensions, an unknown backbone,
a loss that does not fit the head).  Its message is one line naming the problem and
the fix, so the CLI can print it without a traceback.  It subclasses ``ValueError``
so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["FixedclsError"]


class FixedclsError(ValueError):
    """A configuration or input error with a one-line message naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller built, so logs and CLIs stay tidy.
        super().__init__(" ".join(str(message).split()))
