"""latentforge: Stable Diffusion, complete and readable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from latentforge.checkpoints.loading import load
    from latentforge.model import StableDiffusion

_LAZY = {"load": "latentforge.checkpoints.loading", "StableDiffusion": "latentforge.model"}
__all__ = ["StableDiffusion", "load"]


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch) only when the API is first used, so the CLI starts fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latentforge' has no attribute {name!r}")
