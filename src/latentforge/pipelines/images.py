"""Pixels <-> latents: PIL conversion, VAE encode/decode with the NaN guard."""

from __future__ import annotations

import torch
from PIL import Image

from latentforge.data.images import image_to_tensor
from latentforge.model import StableDiffusion
from latentforge.models.vae import DiagonalGaussian
from latentforge.models.vae_banded import decode_banded

# Decodes above this many pixels run in row bands: exact, and for SD1.5 bf16 at 1024 x 1024 the decode's
# own rise is 938 instead of 1699 MiB for 1.5x its CPU time (docs/benchmarks.md, "Memory: where the peak is").
BANDED_DECODE_PIXELS = 768 * 768


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> [B, 3, H, W] float32 in [-1, 1] (data/images.py's colour rules)."""
    return torch.stack([image_to_tensor(image) for image in images])


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images (rounded, as A1111 and diffusers do)."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


@torch.inference_mode()
def encode_images(
    model: StableDiffusion, pixels: torch.Tensor, *, noise: torch.Tensor | None = None, tiled: bool = False
) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (posterior sample when `noise` is given, else its mean).

    `tiled` encodes in overlapping tiles (`tiled_vae.encode_moments_tiled`), for images too large at once.
    """
    from latentforge.pipelines.tiled_vae import encode_moments_tiled

    x = pixels.to(model.vae_device, model.vae_dtype)
    posterior = DiagonalGaussian(encode_moments_tiled(model.vae, x)) if tiled else model.vae.encode(x)
    latents = posterior.mode() if noise is None else posterior.sample(noise.to(posterior.mean))
    return latents.float() * model.family.latent_scale


@torch.inference_mode()
def decode_latents(
    model: StableDiffusion, latents: torch.Tensor, *, tiled: bool = False
) -> tuple[torch.Tensor, bool]:
    """Scaled latents -> pixels in [-1, 1]; returns (pixels, retried_in_fp32).

    Half-precision VAEs (notably SD's in fp16) overflow on some latents; the result is checked and
    decoded again in float32 when it is not finite, as A1111's "NaN check" does. `tiled` decodes in
    overlapping tiles (`tiled_vae.decode_tiled_unscaled`); otherwise images above `BANDED_DECODE_PIXELS`
    decode in row bands (`models/vae_banded.py`: exact, less memory, slower). The latents go in
    channels-last: every conv then runs in that layout without reordering its input and output (on CPU,
    SD1.5 at 512 px in bf16: 3.3x less time and 230 MiB less peak memory than NCHW; the same result up
    to rounding).
    """
    from latentforge.pipelines.tiled_vae import decode_tiled_unscaled

    z = latents / model.family.latent_scale

    def decode(dtype: torch.dtype) -> torch.Tensor:
        z_in = z.to(model.vae_device, dtype).contiguous(memory_format=torch.channels_last)
        if tiled:
            pixels = decode_tiled_unscaled(model.vae, z_in)
        elif z_in.shape[-2] * z_in.shape[-1] * model.vae.config.downsampling_factor**2 > BANDED_DECODE_PIXELS:
            pixels = decode_banded(model.vae, z_in)
        else:
            pixels = model.vae.decode(z_in)
        return pixels.float().contiguous()

    compiled = None if tiled or model.backend is None else model.backend.decode(model.vae, z)  # backends/
    pixels = compiled if compiled is not None else decode(model.vae_dtype)
    if torch.isfinite(pixels).all() or model.vae_dtype == torch.float32:
        return pixels, False
    dtype = model.vae_dtype
    model.vae.float()  # in place: only the VAE's own weights are duplicated, for this call
    try:
        return decode(torch.float32), True
    finally:
        model.vae.to(dtype)


@torch.inference_mode()
def decode_latents_fast(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1] through the model's TAESD (it decodes the scaled latents)."""
    if model.taesd is None:
        raise ValueError("the model has no TAESD: set model.taesd = checkpoints.taesd.read_taesd(folder)")
    parameter = next(model.taesd.parameters())
    return model.taesd.decode(latents.to(parameter.device, parameter.dtype)).float()
