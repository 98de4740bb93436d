"""VAE encode/decode in overlapping tiles, for images whose activations do not fit in memory at once.

Each tile is run on its own and the overlaps are blended with linear ramps that sum to one. Inside
an overlap of width `overlap`, each tile's weight is 0 for the `overlap // 4` pixels nearest its own
edge (where zero padding has changed its output), then rises linearly to 1. A network whose receptive
field reaches at most `overlap // 4` input pixels therefore gives the untiled result up to rounding.
The KL-VAE is not such a network: its GroupNorm statistics and the mid-block self-attention are
global over the image, so tiled output is an approximation (measured in docs/generation.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from latentforge.model import StableDiffusion
from latentforge.models.vae import AutoencoderKL

DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent pixels
ENCODE_TILE, ENCODE_OVERLAP = 512, 128  # image pixels


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride tile - overlap, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    return [*range(0, size - tile, stride), size - tile]


def _ramp(length: int, at_start: bool, at_end: bool, overlap: int, margin: int) -> Tensor:
    """1-D weights of one tile: ramps on the sides that border another tile, 1 elsewhere."""
    w = torch.ones(length, dtype=torch.float64)
    if overlap <= 0:
        return w
    d = torch.arange(length, dtype=torch.float64) + 0.5  # distance of each pixel's centre from the start
    up = ((d - margin) / (overlap - 2 * margin)).clamp(0, 1)
    if not at_start:
        w = w * up
    if not at_end:
        w = w * up.flip(0)
    return w


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int, scale: float, align: int = 1
) -> Tensor:
    """`fn` over overlapping tiles of x [B, C, H, W], blended; fn maps a tile to scale times its size.

    `tile` and `overlap` are in input pixels; `align` keeps tile origins on a grid (the VAE factor when
    encoding, so that each tile maps to whole latent pixels).
    """
    _, _, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x)
    if tile % align or overlap % align:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {align}")
    margin = overlap // 4 if overlap >= 4 else 0
    ov, mg = round(overlap * scale), round(margin * scale)
    out: Tensor | None = None
    weight: Tensor | None = None
    for y0 in tile_starts(height, tile, overlap):
        for x0 in tile_starts(width, tile, overlap):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            piece = fn(x[:, :, y0:y1, x0:x1])
            if out is None or weight is None:  # first tile: [B, C', H * scale, W * scale]
                size = (round(height * scale), round(width * scale))
                out = piece.new_zeros(*piece.shape[:2], *size)
                weight = torch.zeros(size, dtype=torch.float64)
            oy, ox = round(y0 * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, y0 == 0, y1 == height, ov, mg)
            wx = _ramp(pw, x0 == 0, x1 == width, ov, mg)
            w = wy[:, None] * wx[None, :]  # [ph, pw]
            out[:, :, oy : oy + ph, ox : ox + pw] += piece * w.to(piece)
            weight[oy : oy + ph, ox : ox + pw] += w
    assert out is not None and weight is not None
    return out / weight.to(out)


def decode_tiled_unscaled(
    vae: AutoencoderKL, z: Tensor, *, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> Tensor:
    """`vae.decode` (unscaled latents -> pixels) in tiles of `tile` latent pixels."""
    f = vae.config.downsampling_factor
    return tiled_apply(vae.decode, z, tile=tile, overlap=overlap, scale=f)


def encode_moments_tiled(
    vae: AutoencoderKL, x: Tensor, *, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP
) -> Tensor:
    """The posterior's moments [B, 2C, h, w] (as `vae.encode` computes them) in tiles of `tile` pixels."""
    f = vae.config.downsampling_factor

    def moments(piece: Tensor) -> Tensor:
        return vae.quant_conv(vae.encoder(piece))

    return tiled_apply(moments, x, tile=tile, overlap=overlap, scale=1 / f, align=f)


@torch.inference_mode()
def decode_tiled(
    model: StableDiffusion, latents: Tensor, *, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> Tensor:
    """Scaled latents [B, C, h, w] -> pixels in [-1, 1], decoded in overlapping tiles of latent pixels."""
    z = (latents / model.family.latent_scale).to(model.vae_device, model.vae_dtype)
    return decode_tiled_unscaled(model.vae, z, tile=tile, overlap=overlap).float()


@torch.inference_mode()
def encode_tiled(
    model: StableDiffusion, pixels: Tensor, *, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP
) -> Tensor:
    """Pixels in [-1, 1] -> scaled latents (posterior mean), encoded in overlapping tiles of image pixels."""
    x = pixels.to(model.vae_device, model.vae_dtype)
    mean = encode_moments_tiled(model.vae, x, tile=tile, overlap=overlap).chunk(2, dim=1)[0]
    return mean.float() * model.family.latent_scale
