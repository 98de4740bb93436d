"""UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector on the data prediction x0.

Notation: the paper's VP quantities alpha_t, sigma_t (here a_t, sd_t), lambda_t = log(a_t / sd_t) map to
k-diffusion's x = z_t / a_t = x0 + sigma eps by a_t = 1 / sqrt(1 + sigma^2), sd_t = sigma a_t, so
lambda = -log(sigma) and the data-prediction update (Algorithm 2 / eq. 5 with B(h)) divided by a_t reads
    x_t = (sigma_t / sigma_s) x_s - h_phi_1 m_0 - B(h) sum_k rho_k D_k,   hh = -h = lambda_s - lambda_t,
    h_phi_1 = expm1(hh),  D_k = (m_k - m_0) / r_k,  r_k = (lambda_{s_k} - lambda_s) / h,
with m_k = D(x, sigma) the model's x0 at earlier steps, B(h) = hh ("bh1") or expm1(hh) ("bh2"), and rho
solving R rho = b with R_{jk} = r_k^j, b_j = j! phi_{j+1}(hh) / B(h) (Theorem 3.1). The predictor UniP
uses the p - 1 previous outputs (rho = 1/2 at order 2, as the reference code); the corrector UniC reuses the
model output at the new point (no extra call) with one more row (rho = 1/2 at order 1).

Schedules: diffusers' UniPCMultistepScheduler ("linspace" spacing, final_sigmas_type "zero") is fed its own
sigmas; A1111's UniPC (the original uni_pc.py, "time_uniform" in continuous t in [1/T, 1], default variant
bh1, order 3) ends at alphas_cumprod[0], i.e. sigmas ending in ``model_sigmas[0]`` instead of 0. A step to
sigma 0 is always order 1 (x = m_0): higher orders extrapolate to lambda = inf.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from latentforge.sampling.common import Callback, Denoiser, NoiseFn, report

__all__ = ["sample_unipc"]


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    lambdas: list[float],
    outputs: list[Tensor],
    variant: str,
    model_next: Tensor | None = None,
) -> Tensor:
    """One UniP step (``model_next`` None) or UniC correction, sigma -> sigma_next (float64 coefficients).

    ``outputs``/``lambdas`` are m_0 (at sigma, last) and earlier outputs; their count is the order.
    """
    lambda_s, lambda_t = -math.log(sigma), -math.log(sigma_next)
    h = lambda_t - lambda_s
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    m0 = outputs[-1]
    order = len(outputs)
    rks = [(lambdas[-1 - k] - lambda_s) / h for k in range(1, len(outputs))] + [1.0]
    d1s = [(outputs[-1 - k] - m0) / rks[k - 1] for k in range(1, len(outputs))]
    # b_j = j! phi_{j+1}(hh) / B(h) via phi_{k+1}(hh) = (phi_k(hh) - 1/k!) / hh, starting from h_phi_1.
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor([[rk ** (j - 1) for rk in rks] for j in range(1, order + 1)], dtype=torch.float64)
    b_vec = torch.tensor(b, dtype=torch.float64)
    x_t = sigma_next / sigma * x - h_phi_1 * m0
    if model_next is None:  # UniP
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else torch.linalg.solve(r[:-1, :-1], b_vec[:-1]).tolist()
        return x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    rhos = [0.5] if order == 1 else torch.linalg.solve(r, b_vec).tolist()  # UniC
    correction = sum(rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)) + rhos[-1] * (model_next - m0)
    return x_t - b_h * correction


def sample_unipc(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    order: int = 2,
    variant: Literal["bh1", "bh2"] = "bh2",
    lower_order_final: bool = True,
    use_corrector: bool = True,
) -> Tensor:
    """UniPC multistep (Zhao et al. 2023, Algorithm 2 with UniP-p and UniC-p), deterministic.

    Warm-up raises the order by one per step; ``lower_order_final`` caps it by the steps left (diffusers).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: 'bh1', 'bh2'")
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    n = len(sigmas) - 1
    outputs: list[Tensor] = []  # m_k, oldest first, at most `order` kept
    lambdas: list[float] = []
    x_prev, order_prev = x, 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i].expand(x.shape[0]))
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        if outputs and use_corrector:  # UniC: refine x_i with the output at x_i itself (no extra call)
            k = order_prev
            x = _unipc_update(
                x_prev, float(sigmas[i - 1]), sigma, lambdas[-k:], outputs[-k:], variant, denoised
            )
        outputs, lambdas = [*outputs, denoised][-order:], [*lambdas, -math.log(sigma)][-order:]
        this_order = min(order, len(outputs), n - i if lower_order_final else order)
        if sigma_next == 0:
            x = denoised
            continue
        x_prev, order_prev = x, this_order
        x = _unipc_update(x, sigma, sigma_next, lambdas[-this_order:], outputs[-this_order:], variant)
    return x
