"""Live previews of the current x0 estimate: a linear map per latent pixel, TAESD, or the VAE itself.

A projection is a [C + 1, 3] matrix (the last row a bias) from scaled latents to pixels in [-1, 1].
For the Stable Diffusion VAE we use the widely published factors (A1111's "Approx cheap",
modules/sd_vae_approx.py `cheap_approximation`, from
https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2). Any other VAE
gets a least-squares fit of colours on its own latents, so the preview is a function of the VAE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from latentforge.model import StableDiffusion
from latentforge.models.configs import VAEConfig
from latentforge.models.families import SD_VAE
from latentforge.models.taesd import TinyAutoencoder
from latentforge.pipelines.images import encode_images, tensor_to_pil

_SD_CHEAP = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
# Published latent -> RGB factors by VAE architecture (the fitted fallback covers everything else).
PUBLISHED_PROJECTIONS: dict[tuple[VAEConfig, float], tuple[tuple[float, ...], ...]] = {
    (SD_VAE, 0.18215): (*_SD_CHEAP, (0.0, 0.0, 0.0)),
}


@torch.inference_mode()
def fit_latent_rgb(model: StableDiffusion, *, images: int = 8, size: int = 64, seed: int = 0) -> Tensor:
    """Least-squares [C + 1, 3] projection: encode smooth random colour fields, regress pixels on latents."""
    generator = torch.Generator().manual_seed(seed)
    f = model.family.vae.downsampling_factor
    size = max(size, 4 * f) // f * f
    coarse = torch.rand(images, 3, 4, 4, generator=generator) * 2 - 1
    pixels = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    latents = encode_images(model, pixels).cpu().double()  # [N, C, h, w]
    target = F.avg_pool2d(pixels.double(), f)  # [N, 3, h, w]: the colour each latent pixel covers
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # bias column
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution.float()


def latent_rgb_projection(model: StableDiffusion) -> Tensor:
    """The model's latent -> RGB projection [C + 1, 3]: published factors for SD's VAE, else fitted."""
    published = PUBLISHED_PROJECTIONS.get((model.family.vae, model.family.latent_scale))
    return torch.tensor(published) if published is not None else fit_latent_rgb(model)


def latent_preview(latents: Tensor, projection: Tensor) -> Image.Image:
    """A cheap preview of latents [C, h, w] (or the first of [B, C, h, w]) at latent resolution."""
    z = latents[0] if latents.ndim == 4 else latents
    z = z.detach().float().cpu()
    rgb = torch.einsum("chw,cr->rhw", z, projection[:-1].float()) + projection[-1].float()[:, None, None]
    return tensor_to_pil(rgb[None])[0]


@torch.inference_mode()
def taesd_preview(latents: Tensor, taesd: TinyAutoencoder) -> Image.Image:
    """A full-size preview of latents [C, h, w] (or the first of [B, C, h, w]) through TAESD's decoder."""
    z = latents[:1] if latents.ndim == 4 else latents[None]
    parameter = next(taesd.parameters())
    return tensor_to_pil(taesd.decode(z.detach().to(parameter.device, parameter.dtype)))[0]


# A1111's `show_progress_type` setting (modules/shared_options.py) and what each is here. "Approx NN" is
# A1111's small latent -> RGB conv net trained on SD latents and downloaded on first use: we have no such
# file, so it previews as "Approx cheap". "TAESD" without a tiny decoder loaded (the embedded model ships
# one; --taesd gives SD's) also falls back to "Approx cheap" (A1111 would download TAESD).
PREVIEW_TYPES = ("Full", "Approx NN", "Approx cheap", "TAESD")


@torch.inference_mode()
def preview_image(model: StableDiffusion, latents: Tensor, kind: str, projection: Tensor) -> Image.Image:
    """The preview of scaled latents [B, C, h, w] (the first image) as the `kind` of PREVIEW_TYPES says.

    "Full" decodes with the model's VAE (its own dtype; no fp32 retry: a preview may show what the final
    decode would have retried), "TAESD" with `model.taesd`, the others by `projection` at latent size.
    """
    if kind == "Full":
        parameter = next(model.vae.parameters())
        z = latents[:1] / model.family.latent_scale
        return tensor_to_pil(model.vae.decode(z.to(parameter.device, parameter.dtype)).nan_to_num())[0]
    if kind == "TAESD" and model.taesd is not None:
        return taesd_preview(latents, model.taesd)
    return latent_preview(latents, projection)
