"""The Python API in a few calls: `load`, then `txt2img` / `img2img` returning PIL images.

Each image carries its A1111 infotext in `image.info["parameters"]`, so `image.save(path, pnginfo=...)`
or `latentforge.pipelines.infotext.save_png` keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import generate, iter_generate_each, prepare_params
from latentforge.pipelines.infotext import PNG_KEY
from latentforge.pipelines.params import params_from_dict


def _images(results: list[Any]) -> list[Image.Image]:
    for result in results:
        result.image.info[PNG_KEY] = result.infotext
    return [result.image for result in results]


def txt2img(model: StableDiffusion, prompt: str | Sequence[str], **options: Any) -> list[Image.Image]:
    """Images for a prompt; options are `GenerationParams` fields (steps, sampler, cfg_scale, seed ...).

    A list of prompts gives one image per prompt, image i with seed + i, `batch_size` images per batch.
    """
    if isinstance(prompt, str):
        return _images(generate(model, params_from_dict({"prompt": prompt, **options})))
    params = prepare_params(model, params_from_dict(options))
    pairs = [(text, params.seed + i) for i, text in enumerate(prompt)]
    return _images(list(iter_generate_each(model, pairs, params)))


def img2img(model: StableDiffusion, image: Image.Image, prompt: str, **options: Any) -> list[Image.Image]:
    """Images that start from `image`, noised to `denoising_strength` (default 0.75) and denoised."""
    return _images(generate(model, params_from_dict({"prompt": prompt, **options}), init_images=[image]))
