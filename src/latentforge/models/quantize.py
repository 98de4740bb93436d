"""int8 weight-only storage for Linear and Conv2d: weights held as int8 with one float scale per output
channel (symmetric, absmax / 127), dequantized to the activation dtype at each call, compute in that dtype.

Why not an int8 kernel: on this CPU (Xeon, AMX/AVX512-BF16) `torch._weight_int8pack_mm` ran 7.6x slower
than a bf16 matmul of the same [4096, 320] x [320, 1280] shape (docs/performance.md), so the gain is
memory (half of bf16, a quarter of fp32) at the cost of one dequantization per layer per call.
The conversion is one-way (the float weights are dropped): apply LoRA and other weight patches first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MIN_PARAMS = 4096  # smaller layers (the U-Net's 4-channel in/out convs) stay float
_CHUNK = 1 << 20  # elements per float32 work buffer: a layer's float32 copy never exists whole


def quantizable(shape: Sequence[int], *, min_params: int = MIN_PARAMS) -> bool:
    """Whether a Linear's [out, in] or a Conv2d's [out, in, kh, kw] weight is stored as int8: not a 1x1 conv
    (the U-Net reads `proj_out.weight` of a 1x1 conv as a Linear's, models/unet.py SpatialTransformer) and
    at least `min_params` weights. `quantize_int8` and an int8 load (checkpoints.loading) both ask this."""
    layer = len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) != (1, 1))
    return layer and math.prod(shape) >= min_params


def quantize_per_channel(
    weight: torch.Tensor, via: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale [out]) with weight ~= int8 * scale, symmetric per output channel;
    `via`: of the weight cast to that dtype first (what loading in `via` and quantizing afterwards gives).

    Computed over blocks of output channels (each row is independent), so the work buffers stay small:
    the same result as on the whole tensor at once."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    if w.is_meta:  # structure only (a model built on `meta` before its weights are read)
        return q, scale
    rows = max(1, _CHUNK // max(1, w[0].numel())) if w.shape[0] else 1
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows]
        block = (block.to(via) if via is not None else block).float()
        s = block.flatten(1).abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q[start : start + rows] = (block / s.view(-1, *([1] * (w.ndim - 1)))).round().clamp(-127, 127)
        scale[start : start + rows] = s
    return q, scale


def quantize_entry(
    key: str, weight: torch.Tensor, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A state-dict entry `...weight` as its int8 module holds it once loaded in `dtype` (default: the
    weight's): `...weight` (int8) and `...weight_scale` (in that dtype), what `quantize_int8` gives the
    weight cast to `dtype` (one layer at a time, at load)."""
    q, scale = quantize_per_channel(weight, via=dtype)
    return {key: q, key + "_scale": scale.to(dtype or weight.dtype)}


class _Int8Weight(nn.Module):
    """Shared storage: `weight` (int8 buffer, the original shape) and `weight_scale` [out]."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def _store(self, source: nn.Linear | nn.Conv2d) -> None:
        q, scale = quantize_per_channel(source.weight)
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.to(source.weight.dtype))
        self.bias = source.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        scale = self.weight_scale.to(dtype).view(-1, *([1] * (self.weight.ndim - 1)))
        return self.weight.to(dtype).mul_(scale)  # one weight-sized temporary per call, not two


class Int8Linear(_Int8Weight):
    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self._store(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)


class Int8Conv2d(_Int8Weight):
    def __init__(self, source: nn.Conv2d) -> None:
        super().__init__()
        self._store(source)
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.groups = source.dilation, source.groups
        if source.padding_mode != "zeros":
            raise ValueError(f"int8 conv supports zero padding only, not {source.padding_mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(
            x, self.dequantized(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups
        )


def quantize_int8(module: nn.Module, *, min_params: int = MIN_PARAMS) -> int:
    """Replace every Linear and Conv2d whose weight is `quantizable` by its int8 form, in place; returns how
    many were replaced. On a module built on `meta` it only changes the structure (int8 `meta` buffers)."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Int8Linear | Int8Conv2d):
            continue
        if type(child) is nn.Linear or type(child) is nn.Conv2d:
            assert isinstance(child, nn.Linear | nn.Conv2d)
            if quantizable(tuple(child.weight.shape), min_params=min_params):
                setattr(
                    module, name, Int8Linear(child) if isinstance(child, nn.Linear) else Int8Conv2d(child)
                )
                replaced += 1
        else:
            replaced += quantize_int8(child, min_params=min_params)
    return replaced
