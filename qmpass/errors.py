"""Exceptions that carry a sentence a user can act on.

The CLI turns :class:`QmpassInputError` into one line on stderr and exit code 2; anything
else is an internal error (exit code 1).
"""

from __future__ import annotations

__all__ = ["QmpassInputError"]


class QmpassInputError(ValueError):
    """The input (a model file, a flag, a tensor) is unusable; the message says why."""
