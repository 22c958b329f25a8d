"""Exceptions of the worker side; each message says what is wrong and where."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or committed (the previous one stays valid)."""


class CheckpointDirError(CheckpointError):
    """The checkpoint directory is missing, not a directory, or not writable."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint does not fit the objects it is restored into (shape, dtype, structure)."""


class ConfigError(ValueError):
    """A bad policy value (keyword or PREEMPTD_* env); the message names it."""
