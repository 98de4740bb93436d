"""Tiled vs whole-image VAE decode/encode error, in 8-bit pixel levels (issue 19 asked for measured numbers).

    PYTHONPATH=src python scripts/measure_tiled_vae.py [--size 768]

Latents are the posterior mean of a smooth synthetic image (gradients + discs), decoded whole and with the
default tiles (`decode_tiled`: 64 latent pixels, overlap 16), on the random tiny VAE and the embedded model.
"""

from __future__ import annotations

import argparse
import math

import torch

from latentforge.checkpoints.loading import default_model_path
from latentforge.model import StableDiffusion, load
from latentforge.models.families import TINY
from latentforge.pipelines.images import decode_latents, encode_images
from latentforge.pipelines.tiled_vae import decode_tiled, encode_tiled


def synthetic_image(size: int) -> torch.Tensor:
    """[1, 3, size, size] in [-1, 1]: colour gradients and a few discs (edges and flat areas)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * math.pi * x * y)])
    for cx, cy, r, colour in [
        (0.3, 0.3, 0.15, (1, 0, 0)),
        (0.7, 0.6, 0.2, (0, 0, 1)),
        (0.5, 0.8, 0.1, (1, 1, 0)),
    ]:
        disc = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        for c in range(3):
            image[c][disc] = colour[c]
    return image.unsqueeze(0) * 2 - 1


def measure(name: str, model: StableDiffusion, size: int) -> None:
    pixels = synthetic_image(size)
    with torch.no_grad():
        latents = encode_images(model, pixels)

        whole, _ = decode_latents(model, latents, tiled=False)
        tiled = decode_tiled(model, latents).clamp(-1, 1)
        error = (whole.clamp(-1, 1) - tiled).abs() * 127.5  # [-1, 1] -> 8-bit levels
        enc = (encode_tiled(model, pixels) - latents).abs()
    print(
        f"{name}: {size}x{size}, latents {tuple(latents.shape[-2:])}: decode max {error.max():.1f}/255, "
        f"mean {error.mean():.2f}/255, 99th pct {error.flatten().quantile(0.99):.1f}/255; "
        f"encode max {enc.max():.3f}, mean {enc.mean():.4f} (scaled latents)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    measure("random tiny VAE", StableDiffusion.from_family(TINY).eval(), 256)
    measure("embedded model", load(default_model_path(), dtype=torch.float32).eval(), args.size)


if __name__ == "__main__":
    main()
