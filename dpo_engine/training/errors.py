"""The trainer's user error."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot start or go on (a user error, one line)."""
