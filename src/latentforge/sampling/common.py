"""Small pieces every sampler shares: the per-step callback record and the Karras-ODE helpers.

Notation (Karras et al. 2022): x = x0 + sigma * eps, D = denoise(x, sigma) the x0 estimate,
d = (x - D) / sigma = dx/dsigma the probability-flow ODE derivative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Callback",
    "Cond",
    "ConditionedDenoiser",
    "Denoiser",
    "NoiseFn",
    "StepInfo",
    "get_ancestral_step",
    "report",
    "to_d",
]

Cond = dict[str, Tensor]  # conditioning with fixed keys: "crossattn" (text tokens), "concat" (inpainting)
# What a sampler calls: x0 = denoise(x, sigma), conditioning already bound (the pipeline's guided denoiser).
Denoiser = Callable[[Tensor, Tensor], Tensor]
# The model seam under it: x0 = denoise(x, sigma, cond), as k-diffusion's external.py wrappers.
ConditionedDenoiser = Callable[[Tensor, Tensor, Cond], Tensor]
NoiseFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports once per step: step index, noise levels, current x and its x0 estimate."""

    i: int
    sigma: Tensor
    sigma_next: Tensor
    x: Tensor
    denoised: Tensor


Callback = Callable[[StepInfo], "bool | None"]


def report(
    callback: Callback | None, i: int, sigma: Tensor, sigma_next: Tensor, x: Tensor, denoised: Tensor
) -> bool:
    """Call the callback if any; True means the caller asked the sampler to stop and return ``denoised``."""
    return callback is not None and callback(StepInfo(i, sigma, sigma_next, x, denoised)) is True


def to_d(x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D) / sigma (Karras et al. 2022, eq. 3 with s = 1)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / (sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma)


def get_ancestral_step(
    sigma: Tensor | float, sigma_next: Tensor | float, eta: float = 1.0
) -> tuple[Any, Any]:
    """(sigma_down, sigma_up) of an ancestral step: go deterministically to sigma_down, add sigma_up noise.

    sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 is DDPM's posterior variance (Ho et al. 2020, eq. 7
    in VE form), eta = 0 is deterministic.
    """
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up
