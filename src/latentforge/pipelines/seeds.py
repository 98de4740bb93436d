"""Seeds as A1111 uses them: image i of a request has seed + i; variation seeds blend by slerp."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from latentforge.sampling.noise import initial_noise


def resolve_seed(seed: int) -> int:
    """-1 draws a random 32-bit seed (the one used is reported back)."""
    return secrets.randbelow(2**32) if seed == -1 else int(seed)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation exactly as A1111's `slerp` (modules/processing.py), per image.

    Like A1111 it normalises along dim 1 of each image's [C, H, W] noise (rows of H), and falls back
    to `low * t + high * (1 - t)` when the two are nearly parallel.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)  # [C, W]
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(
        1
    ) * high


def request_noise(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    *,
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
) -> torch.Tensor:
    """Initial latent noise [B, *shape] on the CPU in float32; variation seeds mixed in when asked."""
    noise = initial_noise(seeds, shape)
    if subseeds is None or subseed_strength == 0.0:
        return noise
    sub = initial_noise(subseeds, shape)
    return torch.stack([slerp(subseed_strength, a, b) for a, b in zip(noise, sub, strict=True)])
