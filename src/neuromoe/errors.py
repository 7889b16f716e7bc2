"""User-facing error types.

Every problem a user can fix (bad file, bad manifest, bad config, unsafe model directory) is raised as a
:class:`NeuroMoEError` whose message is one line naming the file and the fix. The CLI prints it and
exits with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class NeuroMoEError(Exception):
    """Base class of errors the user can fix; the CLI turns it into one line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [f"{self.path}: {message}" if self.path else message]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__(" — ".join(parts).replace("\n", " "))


class InputError(NeuroMoEError):
    """A data file, manifest or BIDS folder that cannot be used as given."""


class ConfigError(NeuroMoEError):
    """A configuration file, preset or override that is invalid."""


class ModelFormatError(NeuroMoEError):
    """A model directory or checkpoint that is missing, unsafe, or from an incompatible version."""


class TrainingDiverged(NeuroMoEError, FloatingPointError):
    """The loss became NaN/inf: a setting (learning rate, precision) to change, not a crash to debug."""
