"""Exact KL-VAE decoding in horizontal row bands, for images whose full-size activations do not fit.

The decoder runs as usual up to and including its mid block (whose self-attention is global, at the
latent's resolution). Every later layer runs band by band over image rows: a 3x3 conv reads one halo
row above and below its band (zero rows at the image's edges, as its padding), nearest upsampling maps
output row i to input row i // 2, and each GroupNorm's per-group mean and variance are summed over the
whole image first (band by band, in float64), then applied band by band. So only the resnet blocks'
inputs, outputs and inner activations (after conv1) exist at full size, never their normalised and
activated copies; the upsample into the last (full-resolution) level is never stored at all: its rows
are computed again where they are read (one more pass of that conv, for its norm's statistics). The
result equals `AutoencoderKL.decode` up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.models.vae import AutoencoderKL, Decoder, Level, ResnetBlock, Upsample

BAND_PIXELS = 32 * 1024  # pixels per band: 32 rows at 1024 px width


@dataclass(frozen=True)
class Source:
    """A [B, C, H, W] tensor read by rows: `rows(a, b)` gives rows [a, b), stored or computed on demand."""

    rows: Callable[[int, int], Tensor]
    height: int
    width: int
    stored: Tensor | None = None  # the whole tensor, when it exists and is ours to overwrite


def _stored(x: Tensor) -> Source:
    return Source(lambda a, b: x[:, :, a:b], x.shape[2], x.shape[3], x)


def _bands(source: Source, band_pixels: int) -> list[tuple[int, int]]:
    step = max(1, band_pixels // source.width)
    return [(a, min(a + step, source.height)) for a in range(0, source.height, step)]


def _halo(a: int, b: int, height: int) -> tuple[int, int]:
    """The input rows [lo, hi) a 3x3 conv (padding 1) reads for output rows [a, b)."""
    return max(a - 1, 0), min(b + 1, height)


def _conv3x3(conv: nn.Conv2d, x: Tensor, a: int, b: int, height: int) -> Tensor:
    """Output rows [a, b) of `conv` (3x3, padding 1) from its input rows `_halo(a, b, height)`."""
    top, bottom = int(a == 0), int(b == height)
    if top or bottom:  # the conv's zero padding at the top and bottom of the image
        x = F.pad(x, (0, 0, top, bottom))
    return F.conv2d(x, conv.weight, conv.bias, padding=(0, 1))


def _group_stats(norm: nn.GroupNorm, source: Source, band_pixels: int) -> tuple[Tensor, Tensor]:
    """(shift, scale) [B, C, 1, 1] in float64 such that GroupNorm(x) = x * scale + shift, with statistics
    of the whole image: each band's per-group mean and variance (at least float32, torch's group norm kernel),
    merged in float64 with Chan et al.'s parallel-variance update."""
    groups = norm.num_groups
    count = 0
    mean: Tensor | None = None
    m2: Tensor | None = None  # per [B, G]: sum of squared deviations from `mean`
    for a, b in _bands(source, band_pixels):
        x = source.rows(a, b)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        batch, channels, rows, width = x.shape
        _, mean_b, rstd_b = torch.ops.aten.native_group_norm(
            x, None, None, batch, channels, rows * width, groups, 0.0
        )  # [B, G] each
        n_b = channels // groups * rows * width
        mean_b, m2_b = mean_b.double(), rstd_b.double().pow(-2) * n_b  # rstd = 1/std (eps 0)
        if mean is None or m2 is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        delta, total = mean_b - mean, count + n_b
        mean, m2 = mean + delta * (n_b / total), m2 + m2_b + delta.square() * (count * n_b / total)
        count = total
    assert mean is not None and m2 is not None
    rstd = (m2 / count + norm.eps).rsqrt()  # [B, G]
    scale = rstd[:, :, None] * norm.weight.double().view(groups, -1)  # [B, G, C/G]
    shift = norm.bias.double().view(groups, -1) - mean[:, :, None] * scale
    batch = mean.shape[0]
    return shift.reshape(batch, -1, 1, 1), scale.reshape(batch, -1, 1, 1)


def _norm_silu(stats: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    """silu(GroupNorm(x)) from `_group_stats`, computed in float32 (float64 for float64 x), in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    shift, scale = (t.to(dtype) for t in stats)
    return F.silu(torch.addcmul(shift, x, scale), inplace=True).to(x.dtype)


def _empty(like: Tensor, channels: int, height: int, width: int) -> Tensor:
    return like.new_empty(like.shape[0], channels, height, width).contiguous(
        memory_format=torch.channels_last
    )


def _resnet(block: ResnetBlock, source: Source, band_pixels: int) -> Tensor:
    """`block` on `source`, band by band; returns its stored output: `source.stored`, added to in place,
    when the block has no `nin_shortcut` (the second pass reads only conv1's output)."""
    height, width = source.height, source.width
    bands = _bands(source, band_pixels)
    stats = _group_stats(block.norm1, source, band_pixels)
    inner: Tensor | None = None  # conv1's output
    out: Tensor | None = None
    for a, b in bands:
        lo, hi = _halo(a, b, height)
        x = source.rows(lo, hi)
        h = _conv3x3(block.conv1, _norm_silu(stats, x), a, b, height)
        if inner is None or out is None:
            inner = _empty(h, h.shape[1], height, width)
            if block.nin_shortcut is None and source.stored is not None:
                out = source.stored
            else:
                out = _empty(h, h.shape[1], height, width)
        inner[:, :, a:b] = h
        if out is not source.stored:
            skip = x[:, :, a - lo : b - lo]
            out[:, :, a:b] = skip if block.nin_shortcut is None else block.nin_shortcut(skip)
    assert inner is not None and out is not None
    stats = _group_stats(block.norm2, _stored(inner), band_pixels)
    for a, b in bands:
        lo, hi = _halo(a, b, height)
        out[:, :, a:b] += _conv3x3(block.conv2, _norm_silu(stats, inner[:, :, lo:hi]), a, b, height)
    return out


def _upsampled(upsample: Upsample, source: Source) -> Source:
    """conv(nearest 2x upsampling) of `source`, computed for the rows asked for."""
    height = 2 * source.height

    def rows(a: int, b: int) -> Tensor:
        lo, hi = _halo(a, b, height)
        x = F.interpolate(source.rows(lo // 2, (hi + 1) // 2), scale_factor=2.0, mode="nearest")
        x = x[:, :, lo % 2 : lo % 2 + hi - lo]  # upsampled row i is input row i // 2
        return _conv3x3(upsample.conv, x, a, b, height)

    return Source(rows, height, 2 * source.width)


def _store(source: Source, band_pixels: int) -> Tensor:
    out: Tensor | None = None
    for a, b in _bands(source, band_pixels):
        x = source.rows(a, b)
        if out is None:
            out = _empty(x, x.shape[1], source.height, source.width)
        out[:, :, a:b] = x
    assert out is not None
    return out


def decoder_banded(decoder: Decoder, z: Tensor, *, band_pixels: int = BAND_PIXELS) -> Tensor:
    """`decoder(z)` with every layer after the mid block run in bands of about `band_pixels` pixels."""
    source = _stored(decoder.mid(decoder.conv_in(z)).contiguous(memory_format=torch.channels_last))
    levels = [cast(Level, level) for level in reversed(decoder.up)]  # lowest resolution first
    for i, level in enumerate(levels):
        for block in level.block:
            source = _stored(_resnet(cast(ResnetBlock, block), source, band_pixels))
        if isinstance(level.resample, Upsample):
            lazy = _upsampled(level.resample, source)
            last = all(later.resample is None for later in levels[i + 1 :])  # into the full resolution
            source = lazy if last else _stored(_store(lazy, band_pixels))
            del lazy  # the level's output, when stored upsampled
    stats = _group_stats(decoder.norm_out, source, band_pixels)
    out: Tensor | None = None
    for a, b in _bands(source, band_pixels):
        lo, hi = _halo(a, b, source.height)
        x = _norm_silu(stats, source.rows(lo, hi))
        y = _conv3x3(decoder.conv_out, x, a, b, source.height)
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], source.height, source.width)
        out[:, :, a:b] = y
    assert out is not None
    return out


def decode_banded(vae: AutoencoderKL, z: Tensor, *, band_pixels: int = BAND_PIXELS) -> Tensor:
    """`vae.decode(z)` (unscaled latent -> image), exact, with full-size activations stored only between
    layers (see the module docstring)."""
    return decoder_banded(vae.decoder, vae.post_quant_conv(z), band_pixels=band_pixels)
