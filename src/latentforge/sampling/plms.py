"""PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as CompVis, A1111 and diffusers run it.

Notation: PNDM's transfer phi(z_t, eps, t, t - delta) (eq. 9) applied to the VP sample z_t equals, in
k-diffusion's x = z_t / sqrt(abar_t) = x0 + sigma eps with abar_t = 1 / (1 + sigma^2), the Euler step
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) eps',
where eps' is the Adams-Bashforth combination of the noise predictions eps_i = (x_i - D(x_i, sigma_i)) /
sigma_i (eq. 12, with the weights of uniform steps whatever the spacing). The first step has no history and
uses the "pseudo improved Euler" start eps' = (eps(x_i, sigma_i) + eps(x~, sigma_{i+1})) / 2, x~ the Euler
prediction, one extra model call. This is CompVis/A1111's ``plms`` and diffusers' PNDMScheduler with
skip_prk_steps=True (which spends the extra call as a repeated timestep); the two are the same algorithm.
They differ only in timesteps: diffusers takes n steps ending at alphas_cumprod[0] (``schedules.ddim`` with
the trailing 0 replaced by ``model_sigmas[0]``), A1111 >= 1.6 takes n - 1 steps ending at timestep 1
(``schedules.ddim`` without its trailing 0); see ``ddim.py``. The improved-Euler start is skipped when the
first step goes to sigma 0 (eps is undefined there), so a 1-step run is plain DDIM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentforge.sampling.common import Callback, Denoiser, NoiseFn, report

__all__ = ["sample_plms"]

# Adams-Bashforth weights for eps_i, eps_{i-1}, ... (PNDM eq. 12 and its lower-order warm-up).
_ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def sample_plms(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
) -> Tensor:
    """PLMS (PNDM eq. 12 with the pseudo improved Euler start); deterministic, ``noise`` is unused."""
    eps_history: list[Tensor] = []  # newest last, at most 3 kept
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma.expand(x.shape[0]))
        if report(callback, i, sigma, sigma_next, x, denoised):
            return denoised
        eps = (x - denoised) / float(sigma)
        step = float(sigma_next) - float(sigma)
        if not eps_history and float(sigma_next) > 0:
            x_euler = x + step * eps
            eps_next = (x_euler - denoise(x_euler, sigma_next.expand(x.shape[0]))) / float(sigma_next)
            eps_prime = (eps + eps_next) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(eps_history)]
            terms = (w * e for w, e in zip(weights, [eps, *eps_history[::-1]], strict=True))
            eps_prime = sum(terms, torch.zeros_like(eps))  # the Tensor start keeps the type Tensor
        eps_history = [*eps_history[-2:], eps]
        x = x + step * eps_prime
    return x
