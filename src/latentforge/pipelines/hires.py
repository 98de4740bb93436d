"""Hires fix (A1111's txt2img "Hires. fix"): generate small, upscale, then img2img at the target size.

The second pass uses the same seeds (fresh noise of the new shape, as A1111's ImageRNG) and A1111's
hires step accounting: exactly `hires_steps` steps, cut from a schedule of int(hires_steps / strength)
steps. The infotext keeps the first-pass size and adds A1111's "Hires upscale"/"Hires resize",
"Hires steps", "Hires upscaler", "Hires sampler" and "Denoising strength".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import (
    GeneratedImage,
    LatentSource,
    Progress,
    StepCallback,
    batch_seeds,
    decode_results,
    prepare_params,
    sample_latents,
)
from latentforge.pipelines.images import decode_latents, encode_images, pil_to_tensor, tensor_to_pil
from latentforge.pipelines.params import GenerationParams, ParameterError, check_size


@dataclass(frozen=True)
class Upscaler:
    mode: str  # torch interpolate mode (latent upscalers) or a PIL filter name (pixel upscalers)
    antialias: bool = False
    latent: bool = True


# A1111's names: the "Latent ..." modes of shared.latent_upscale_modes, and two plain pixel filters.
UPSCALERS: dict[str, Upscaler] = {
    "Latent": Upscaler("bilinear"),
    "Latent (antialiased)": Upscaler("bilinear", antialias=True),
    "Latent (bicubic)": Upscaler("bicubic"),
    "Latent (bicubic antialiased)": Upscaler("bicubic", antialias=True),
    "Latent (nearest)": Upscaler("nearest"),
    "Latent (nearest-exact)": Upscaler("nearest-exact"),
    "Lanczos": Upscaler("LANCZOS", latent=False),
    "Nearest": Upscaler("NEAREST", latent=False),
}


def upscaler_name(name: str) -> str:
    """The canonical name of an upscaler, matched case-insensitively; errors list the valid names."""
    for known in UPSCALERS:
        if known.lower() == name.lower():
            return known
    raise ParameterError(f"unknown upscaler {name!r}; valid: {', '.join(UPSCALERS)}")


def hires_size(
    width: int, height: int, *, scale: float, resize_width: int = 0, resize_height: int = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((upscale width, height), (final width, height)) as A1111's calculate_target_resolution.

    With both resize sides given and another aspect ratio, the image is upscaled to cover them and
    the excess is cropped from the centre.
    """
    if not resize_width and not resize_height:
        target = (int(width * scale), int(height * scale))
        return target, target
    if not resize_height:
        size = (resize_width, resize_width * height // width)
        return size, size
    if not resize_width:
        size = (resize_height * width // height, resize_height)
        return size, size
    if width / height < resize_width / resize_height:
        cover = (resize_width, resize_width * height // width)
    else:
        cover = (resize_height * width // height, resize_height)
    return cover, (resize_width, resize_height)


def upscale_latents(
    model: StableDiffusion,
    latents: torch.Tensor,
    upscaler: str,
    cover: tuple[int, int],
    final: tuple[int, int],
    *,
    tiled: bool = False,
) -> torch.Tensor:
    """First-pass latents -> latents of the final size: interpolated, or decoded, resized and re-encoded."""
    spec = UPSCALERS[upscaler_name(upscaler)]
    f = model.family.vae.downsampling_factor
    if spec.latent:
        size = (cover[1] // f, cover[0] // f)
        latents = F.interpolate(latents, size=size, mode=spec.mode, antialias=spec.antialias)
    else:
        pixels, _ = decode_latents(model, latents, tiled=tiled)
        resample = getattr(Image.Resampling, spec.mode)
        images = [image.resize(cover, resample) for image in tensor_to_pil(pixels)]
        latents = encode_images(model, pil_to_tensor(images), tiled=tiled)
    h, w = latents.shape[-2:]
    dy, dx = h - final[1] // f, w - final[0] // f  # A1111's truncate_y/x: crop the excess from the centre
    return latents[:, :, dy // 2 : h - (dy + 1) // 2, dx // 2 : w - (dx + 1) // 2]


def iter_hires(
    model: StableDiffusion,
    params: GenerationParams,
    *,
    scale: float = 2.0,
    width: int = 0,
    height: int = 0,
    upscaler: str = "Latent",
    hires_steps: int = 0,
    denoising_strength: float = 0.7,
    hires_sampler: str | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> Iterator[GeneratedImage]:
    """`hires`, yielding each image as soon as its batch is decoded."""
    params = prepare_params(model, params)
    name = upscaler_name(upscaler)
    if not width and not height and not scale > 0:
        raise ParameterError(f"hires scale must be positive, got {scale}")
    cover, final = hires_size(
        params.width, params.height, scale=scale, resize_width=width, resize_height=height
    )
    second = replace(
        params,
        width=final[0],
        height=final[1],
        steps=hires_steps or params.steps,
        sampler=hires_sampler or params.sampler,
        denoising_strength=denoising_strength,
    )
    second.validate(model.family)
    check_size(model.family, *cover)
    extra: dict[str, Any] = {
        "Hires upscale": f"{scale:g}" if not (width or height) else None,
        "Hires resize": f"{width}x{height}" if width or height else None,
        "Hires steps": hires_steps or None,
        "Hires upscaler": name,
        "Hires sampler": hires_sampler if hires_sampler not in (None, params.sampler) else None,
    }
    described = replace(
        params,
        denoising_strength=denoising_strength,
        extra={**params.extra, **{k: v for k, v in extra.items() if v is not None}},
    )
    bar = Progress(params.batch_count * (params.steps + second.steps), callback, progress)
    try:
        for seeds, subseeds in batch_seeds(params):
            latents = sample_latents(model, params, seeds, subseeds, callback=bar)
            if bar.stopped:  # interrupted in the first pass: keep the small image, as A1111
                yield from decode_results(model, params, latents, seeds, subseeds, img2img=False)
                break
            tiled = params.use_tiled_vae(*cover)
            source = LatentSource(upscale_latents(model, latents, name, cover, final, tiled=tiled))
            latents = sample_latents(
                model, second, seeds, subseeds, source=source, callback=bar, exact_steps=True
            )
            yield from decode_results(model, described, latents, seeds, subseeds, img2img=True)
            if bar.stopped:
                break
    finally:
        bar.close()


def hires(
    model: StableDiffusion,
    params: GenerationParams,
    *,
    scale: float = 2.0,
    width: int = 0,
    height: int = 0,
    upscaler: str = "Latent",
    hires_steps: int = 0,
    denoising_strength: float = 0.7,
    hires_sampler: str | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> list[GeneratedImage]:
    """txt2img at `params`' size, then an img2img pass at `scale` times it (or at width x height).

    Args:
        scale: upscale factor of the first pass's size; ignored when width or height is given.
        width, height: target size (A1111's "Resize width/height to"); one alone keeps the aspect ratio.
        upscaler: a name of `UPSCALERS` ("Latent" = bilinear latents, A1111's default; "Lanczos" decodes).
        hires_steps: steps of the second pass (0 = the first pass's steps).
        denoising_strength: strength of the second pass.
        hires_sampler: sampler of the second pass (None = the first pass's).
    """
    return list(
        iter_hires(
            model,
            params,
            scale=scale,
            width=width,
            height=height,
            upscaler=upscaler,
            hires_steps=hires_steps,
            denoising_strength=denoising_strength,
            hires_sampler=hires_sampler,
            callback=callback,
            progress=progress,
        )
    )
