"""int8 weight-only storage for Linear and Conv2d: weights held as int8 with one float scale per output
channel (symmetric, absmax / 127), dequantized to the activation dtype at each call, compute in that dtype.

Why not an int8 kernel: on this CPU (Xeon, AMX/AVX512-BF16) `torch._weight_int8pack_mm` ran 7.6x slower
than a bf16 matmul of the same [4096, 320] x [320, 1280] shape (docs/performance.md), so the gain is
memory (half of bf16, a quarter of fp32) at the cost of one dequantization per layer per call.
The conversion is one-way (the float weights are dropped): apply LoRA and other weight patches first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale [out]) with weight ~= int8 * scale, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.flatten(1).abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = (w / scale.view(-1, *([1] * (w.ndim - 1)))).round().clamp(-127, 127).to(torch.int8)
    return q, scale


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
        return self.weight.to(dtype) * scale


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


def quantize_int8(module: nn.Module, *, min_params: int = 4096) -> int:
    """Replace every Linear and 3x3 Conv2d with at least `min_params` weights by its int8 form, in place;
    returns how many were replaced. Small layers (the U-Net's 4-channel in/out convs) stay in float, and
    so do 1x1 convs: the U-Net reads `proj_out.weight` as a Linear's (models/unet.py SpatialTransformer)."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Int8Linear | Int8Conv2d):
            continue
        if type(child) is nn.Linear or (type(child) is nn.Conv2d and child.kernel_size != (1, 1)):
            assert isinstance(child, nn.Linear | nn.Conv2d)
            if child.weight.numel() >= min_params:
                setattr(
                    module, name, Int8Linear(child) if isinstance(child, nn.Linear) else Int8Conv2d(child)
                )
                replaced += 1
        else:
            replaced += quantize_int8(child, min_params=min_params)
    return replaced
