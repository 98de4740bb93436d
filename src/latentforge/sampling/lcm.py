"""Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1; Song et al. 2023, Algorithm 1).

Notation: the consistency function is f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) with the boundary
scalings of LCM eq. 3 (Song et al. 2023 appendix C, sigma_data = 0.5, timestep scaled by 10 as in
diffusers' LCMScheduler "timestep_scaling"):
    c_skip(t) = sigma_data^2 / ((10 t)^2 + sigma_data^2),  c_out(t) = 10 t / sqrt((10 t)^2 + sigma_data^2),
where z_t = x / sqrt(1 + sigma^2) is the VP sample of k-diffusion's x = x0 + sigma eps and t the model's
timestep of sigma (log-sigma interpolation over ``model_sigmas``). Between steps the estimate is re-noised
to the next level, z_{t'} = sqrt(abar') f + sqrt(1 - abar') eps, i.e. x' = f + sigma' eps in VE form.
A1111 and ComfyUI's "LCM" drop c_skip/c_out (both are within 1e-5 of 0/1 for t >= 19); this keeps them.
``lcm_schedule`` gives LCMScheduler's timesteps (the "original_inference_steps" = 50 skipping grid).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentforge.sampling import schedules
from latentforge.sampling.common import Callback, Denoiser, NoiseFn, report

__all__ = ["boundary_scalings", "lcm_schedule", "sample_lcm"]


def boundary_scalings(
    t: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[float, float]:
    """(c_skip, c_out) at model timestep t (LCM eq. 3); (1, 0) at t = 0, so f(x, 0) = x."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / math.sqrt(scaled**2 + sigma_data**2)


def _sd_model_sigmas() -> Tensor:
    return schedules.model_sigmas(schedules.alphas_cumprod(schedules.betas("scaled_linear")))


def lcm_schedule(n: int, model_sigmas: Tensor, original_steps: int = 50) -> Tensor:
    """LCMScheduler's n timesteps, picked evenly from the distillation grid t = k T / original_steps - 1."""
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM needs 1 <= steps <= original_steps = {original_steps}, got {n}")
    stride = len(model_sigmas) // original_steps
    grid = [k * stride - 1 for k in range(original_steps, 0, -1)]  # descending
    picks = [grid[math.floor(j * original_steps / n)] for j in range(n)]
    return torch.cat([model_sigmas[picks], model_sigmas.new_zeros(1)])


def sample_lcm(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    model_sigmas: Tensor | None = None,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """LCM multistep sampling: consistency estimate f at each sigma, re-noised to the next sigma.

    ``model_sigmas`` (ascending, index = timestep) maps sigma to t for the boundary scalings; the default is
    SD's scaled-linear 1000-step schedule. The callback's ``denoised`` is f; a step to sigma 0 returns f.
    """
    model_sigmas = _sd_model_sigmas() if model_sigmas is None else model_sigmas
    noise = noise if noise is not None else (lambda sigma, sigma_next: torch.randn_like(x))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        c_skip, c_out = boundary_scalings(
            float(schedules.sigma_to_t(sigma, model_sigmas)), sigma_data, timestep_scaling
        )
        denoised = c_out * denoise(x, sigmas[i].expand(x.shape[0])) + c_skip / math.sqrt(1 + sigma**2) * x
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        x = denoised + sigma_next * noise(sigmas[i], sigmas[i + 1]) if sigma_next > 0 else denoised
    return x
