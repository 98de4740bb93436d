"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020) over the denoiser/sigmas seam.

Notation: the papers work with the variance-preserving sample z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
the samplers here carry k-diffusion's x = z_t / sqrt(abar_t) = x0 + sigma eps, with
    abar_t = 1 / (1 + sigma^2),  "alpha_t" in DDIM = abar_t in DDPM,  eps = (x - x0) / sigma,
    t -> sigmas[i], t-1 (the next, less noisy step) -> sigmas[i + 1].
Dividing DDIM eq. 12 by sqrt(abar_{t-1}) gives
    x_{t-1} = x0 + sqrt(sigma_{t-1}^2 - sigma_up^2) eps + sigma_up z,
    sigma_up = eta * sigma_{t-1} / sigma_t * sqrt(sigma_t^2 - sigma_{t-1}^2)  (eq. 16 / sqrt(abar_{t-1}))
so eta = 0 is Euler on the probability-flow ODE and eta = 1 is the DDPM posterior (identical to Euler a).

Which sigmas reproduce which program (SD1.5, T = 1000, r = T // n, ``schedules.ddim`` gives
``model_sigmas[1 + k r]`` for k = n-1 .. 0, then 0):
    diffusers DDIMScheduler(set_alpha_to_one=False, steps_offset=1, "leading"), and CompVis DDIMSampler:
        n steps, the last to alphas_cumprod[0]: replace the trailing 0 by ``model_sigmas[0]``.
    diffusers set_alpha_to_one=True: the schedule as is (last step to sigma 0, i.e. abar = 1).
    A1111 >= 1.6 (sd_samplers_timesteps_impl.ddim): n - 1 steps, the last ending at timestep 1 (no model
        call there): drop the trailing 0.
With a nonzero final sigma the result is x = x0 + sigma_min eps (VE), which is the VP latent A1111 and
diffusers decode divided by sqrt(abar_0) = 0.99957. A1111/diffusers also start from z_T = noise, i.e.
x = noise * sqrt(1 + sigma_max^2), rather than k-diffusion's noise * sigma_max; that is the caller's choice.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from latentforge.sampling.common import Callback, Denoiser, NoiseFn, report

__all__ = ["sample_ddim", "sample_ddpm"]


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16; eta > 1 is clamped: sigma_up <= sigma_next.

    diffusers' DDIMScheduler(eta) draws ``variance_noise`` exactly where ``noise`` is called here.
    """
    noise = noise if noise is not None else (lambda sigma, sigma_next: torch.randn_like(x))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i].expand(x.shape[0]))
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        sigma_up = min(sigma_next, eta * sigma_next / sigma * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = denoised + sigma_down / sigma * (x - denoised)
        if sigma_up > 0:
            x = x + sigma_up * noise(sigmas[i], sigmas[i + 1])
    return x


def sample_ddpm(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    variance: Literal["small", "large"] = "small",
) -> Tensor:
    """DDPM ancestral sampling from the posterior q(z_{t-1} | z_t, x0), Ho et al. 2020 eqs. 6-7.

    beta_t = 1 - abar_t / abar_{t-1} over consecutive sigmas (adjacent timesteps for the full 1000-step
    schedule). ``variance`` is sigma_t^2 of sec. 3.2: "small" = beta~_t (diffusers "fixed_small"),
    "large" = beta_t ("fixed_large"). No noise is added on a step to sigma 0 (the paper's z = 0 at t = 1).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown DDPM variance {variance!r}; valid: 'small', 'large'")
    noise = noise if noise is not None else (lambda sigma, sigma_next: torch.randn_like(x))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i].expand(x.shape[0]))
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        abar_t, abar_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta_t = 1 - abar_t / abar_prev
        # Eq. 7 over sqrt(abar_{t-1}); z_t = sqrt(abar_t) x, sqrt(alpha_t abar_t / abar_{t-1}) = alpha_t.
        coef_x0 = beta_t / (1 - abar_t)
        coef_x = (1 - beta_t) * (1 - abar_prev) / (1 - abar_t)
        x = coef_x0 * denoised + coef_x * x
        if sigma_next > 0:
            var = beta_t * (1 - abar_prev) / (1 - abar_t) if variance == "small" else beta_t
            x = x + math.sqrt(var / abar_prev) * noise(sigmas[i], sigmas[i + 1])
    return x
