"""latentforge: Stable Diffusion, complete and readable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from latentforge.api import extract_lora, from_png, img2img, inpaint, merge, merge_loras, run, txt2img
    from latentforge.checkpoints.controlnet import load_controlnet
    from latentforge.checkpoints.embeddings import read_embedding, write_embedding
    from latentforge.model import StableDiffusion, load
    from latentforge.pipelines.controlnet import ControlNetUnit
    from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, Inpaint

_LAZY = {
    "load": "latentforge.model",
    "StableDiffusion": "latentforge.model",
    "txt2img": "latentforge.api",
    "img2img": "latentforge.api",
    "inpaint": "latentforge.api",
    "run": "latentforge.api",
    "from_png": "latentforge.api",
    "merge": "latentforge.api",
    "merge_loras": "latentforge.api",
    "extract_lora": "latentforge.api",
    "GenerationRequest": "latentforge.pipelines.request",
    "Hires": "latentforge.pipelines.request",
    "InitImage": "latentforge.pipelines.request",
    "Inpaint": "latentforge.pipelines.request",
    "read_embedding": "latentforge.checkpoints.embeddings",
    "write_embedding": "latentforge.checkpoints.embeddings",
    "load_controlnet": "latentforge.checkpoints.controlnet",
    "ControlNetUnit": "latentforge.pipelines.controlnet",
}
__all__ = [
    "ControlNetUnit",
    "GenerationRequest",
    "Hires",
    "InitImage",
    "Inpaint",
    "StableDiffusion",
    "extract_lora",
    "from_png",
    "img2img",
    "inpaint",
    "load",
    "load_controlnet",
    "merge",
    "merge_loras",
    "read_embedding",
    "run",
    "txt2img",
    "write_embedding",
]


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch) only when the API is first used, so the CLI starts fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'latentforge' has no attribute {name!r}")
