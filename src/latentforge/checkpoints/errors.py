"""Checkpoint errors: each names the file and says what to do about it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from latentforge.errors import LatentforgeError


class CheckpointError(LatentforgeError):
    """Base class of every error raised while reading or matching a checkpoint."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class NotAWeightsFileError(CheckpointError):
    """A git-lfs pointer, an HTML page or some other non-weights file saved under a model name."""


class CorruptCheckpointError(CheckpointError):
    """Truncated or malformed file."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that wants to run code or build objects beyond tensors; it is never executed."""


class UnknownArchitectureError(CheckpointError):
    """The weights match no model family in the table."""


class KeyMismatchError(CheckpointError):
    """The weights look like a known family but keys or shapes differ."""

    def __init__(
        self,
        path: str | Path,
        component: str,
        family: str,
        missing: Iterable[str],
        unexpected: Iterable[str],
        wrong_shape: Iterable[str] = (),
        show: int = 8,
    ) -> None:
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        self.wrong_shape = sorted(wrong_shape)
        parts = [f"{component} does not match family {family!r}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("wrong shape", self.wrong_shape),
        ):
            if keys:
                more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
        super().__init__(path, "; ".join(parts))


class ExportError(CheckpointError, ValueError):
    """One of our own component exports (VAE, CLIP, text encoder) that cannot be read or written as asked:
    its config metadata is missing (pass the config) or a shared text tower does not match."""
