"""Hires fix (A1111's txt2img "Hires. fix"): generate small, upscale, then img2img at the target size.

The second pass uses the same seeds (fresh noise of the new shape, as A1111's ImageRNG) and A1111's
hires step accounting: exactly `hires_steps` steps, cut from a schedule of int(hires_steps / strength)
steps. The infotext keeps the first-pass size and adds A1111's "Hires upscale"/"Hires resize",
"Hires steps", "Hires upscaler", "Hires sampler" and "Denoising strength".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import LatentSource, StepCallback, sample_latents
from latentforge.pipelines.images import decode_latents, encode_images, pil_to_tensor, tensor_to_pil
from latentforge.pipelines.request import UPSCALERS, Batch, ResolvedRequest, hires_size, upscaler_name


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


def hires_pass(
    model: StableDiffusion,
    resolved: ResolvedRequest,
    batch: Batch,
    latents: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    refiner: StableDiffusion | None = None,
) -> torch.Tensor:
    """First-pass latents -> upscaled -> the img2img pass at the target size (same seeds, fresh noise).

    With an SDXL `refiner`, this pass switches to it at `request.refiner.switch_at` by the same timestep
    rule as a plain run, conditioned at the hires size (A1111's default "Hires fix: which pass to enable
    refiner for" = "second pass"; the first pass then runs on the base model alone)."""
    r, second = resolved.request, resolved.second
    assert r.hires is not None and second is not None
    cover, final = hires_size(
        r.width, r.height, scale=r.hires.scale, resize_width=r.hires.resize_width,
        resize_height=r.hires.resize_height,
    )  # fmt: skip
    tiled = r.use_tiled_vae(*cover)
    source = LatentSource(upscale_latents(model, latents, r.hires.upscaler, cover, final, tiled=tiled))
    return sample_latents(
        model, r, second, batch, size=final, source=source, strength=r.hires.denoising_strength,
        callback=callback, exact_steps=True, refiner=refiner,
    )  # fmt: skip
