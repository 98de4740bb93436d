"""The errors a user can cause, one base class: the CLI prints any of them as one `error:` line, exit 2.

Every message names what it concerns (a file, a config key, a request field) and, where there is one,
the fix. Errors that are bugs in latentforge stay ordinary exceptions and keep their traceback.
This module imports nothing from the package, so every layer may raise these.
"""

from __future__ import annotations

from pathlib import Path


class LatentforgeError(Exception):
    """Base of every error a user can cause (bad file, config, request or image)."""


class ParameterError(LatentforgeError, ValueError):
    """A generation request that cannot be run; raised before any work is done. Names the field."""


class ConfigError(LatentforgeError, ValueError):
    """A run config (TOML file or override) with a missing, unknown or out-of-range value."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(message if path is None else f"{path}: {message}")


class FileFormatError(LatentforgeError):
    """A file that is not what its use needs (image, mask, prompts list, dataset, export): names the file."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class OutputError(LatentforgeError):
    """Where results would go cannot be written (a file in the way, read-only, full)."""


class NonFiniteError(LatentforgeError):
    """NaN or Inf where numbers must be finite (weights, a decoded image, a loss); names the cause."""
