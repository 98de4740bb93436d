"""The Python API in a few calls: `load`, then `txt2img` / `img2img` returning PIL images.

Each image carries its A1111 infotext in `image.info["parameters"]`, so `image.save(path, pnginfo=...)`
or `latentforge.pipelines.infotext.save_png` keeps it.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import generate
from latentforge.pipelines.infotext import PNG_KEY
from latentforge.pipelines.params import params_from_dict


def _images(results: list[Any]) -> list[Image.Image]:
    for result in results:
        result.image.info[PNG_KEY] = result.infotext
    return [result.image for result in results]


def txt2img(model: StableDiffusion, prompt: str, **options: Any) -> list[Image.Image]:
    """Images for a prompt; options are `GenerationParams` fields (steps, sampler, cfg_scale, seed ...)."""
    return _images(generate(model, params_from_dict({"prompt": prompt, **options})))


def img2img(model: StableDiffusion, image: Image.Image, prompt: str, **options: Any) -> list[Image.Image]:
    """Images that start from `image`, noised to `denoising_strength` (default 0.75) and denoised."""
    return _images(generate(model, params_from_dict({"prompt": prompt, **options}), init_images=[image]))
