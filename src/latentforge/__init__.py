"""latentforge: Stable Diffusion, complete and readable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from latentforge.api import img2img, txt2img
    from latentforge.model import StableDiffusion, load
    from latentforge.pipelines.generate import generate
    from latentforge.pipelines.params import GenerationParams

_LAZY = {
    "load": "latentforge.model",
    "StableDiffusion": "latentforge.model",
    "txt2img": "latentforge.api",
    "img2img": "latentforge.api",
    "generate": "latentforge.pipelines.generate",
    "GenerationParams": "latentforge.pipelines.params",
}
__all__ = ["GenerationParams", "StableDiffusion", "generate", "img2img", "load", "txt2img"]


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch) only when the API is first used, so the CLI starts fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latentforge' has no attribute {name!r}")
