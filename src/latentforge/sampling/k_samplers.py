"""Samplers on the Karras ODE/SDE in sigma: Euler, Heun, DPM2, LMS, DPM-Solver++ variants, Restart.

All share ``sample_x(denoise, x, sigmas, *, callback=None, noise=None, **options) -> x``:
``x`` starts at noise level ``sigmas[0]`` (``noise * sigmas[0]`` for txt2img, or a noised image with a
suffix of the schedule for img2img), ``sigmas`` descend, usually to a trailing 0. Randomness comes only
from ``noise(sigma, sigma_next) -> N(0, I)`` (see noise.py); ``callback(StepInfo)`` returning True stops
early and returns the current x0 estimate. Gradients are not disabled here: wrap in ``torch.no_grad()``.

Notation (Karras et al. 2022; Lu et al. 2022 "DPM-Solver++"): x = x0 + sigma eps, D = denoise(x, sigma),
d = (x - D) / sigma, lambda = -log sigma (the half log-SNR; `lam` in the code, k-diffusion's t),
h = lambda_next - lambda, r = ratio of the previous to the current step size in lambda.
The algorithms follow k-diffusion's sampling.py (Crowson), written independently; references per function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from latentforge.sampling.common import (
    Callback,
    Denoiser,
    NoiseFn,
    StepInfo,
    get_ancestral_step,
    report,
    to_d,
)
from latentforge.sampling.noise import BrownianNoiseSampler

__all__ = [
    "StepInfo",
    "lms_coefficients",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_restart",
]


def _den(denoise: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    return denoise(x, sigma.expand(x.shape[0]))


def _gaussian_noise(x: Tensor, noise: NoiseFn | None) -> NoiseFn:
    return noise if noise is not None else (lambda sigma, sigma_next: torch.randn_like(x))


def _brownian_noise(x: Tensor, sigmas: Tensor, noise: NoiseFn | None) -> NoiseFn:
    """Default for SDE samplers: a Brownian tree with random seeds (pass seeded noise to reproduce)."""
    if noise is not None:
        return noise
    seeds = torch.randint(0, 2**63 - 1, (x.shape[0],)).tolist()
    positive = sigmas[sigmas > 0]
    return BrownianNoiseSampler(
        seeds, tuple(x.shape[1:]), float(positive.min()), float(sigmas.max()), device=x.device, dtype=x.dtype
    )


def _churn(
    x: Tensor,
    sigmas: Tensor,
    i: int,
    noise: NoiseFn | None,
    churn: float,
    tmin: float,
    tmax: float,
    s_noise: float,
) -> tuple[Tensor, Tensor]:
    """Karras et al. 2022, Algorithm 2 lines 4-6: raise sigma to (1 + gamma) sigma with fresh noise."""
    gamma = min(churn / (len(sigmas) - 1), 2**0.5 - 1) if tmin <= sigmas[i] <= tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        eps = _gaussian_noise(x, noise)(sigmas[i], sigma_hat)
        x = x + eps * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def sample_euler(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps on the probability-flow ODE, optional churn (Karras et al. 2022, Algorithm 2)."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _den(denoise, x, sigma_hat)
        if report(callback, i, sigma_hat, sigmas[i + 1], x, denoised):
            return denoised
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler step down to sigma_down, then fresh noise up to sigma_next ("Euler a")."""
    noise = _gaussian_noise(x, noise)
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler for the final step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _den(denoise, x, sigma_hat)
        if report(callback, i, sigma_hat, sigmas[i + 1], x, denoised):
            return denoised
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], _den(denoise, x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(denoise: Denoiser, x: Tensor, d: Tensor, sigma: Tensor, sigma_to: Tensor) -> Tensor:
    """Midpoint step evaluated at the geometric mean of sigma and sigma_to (DPM-Solver-2 in sigma)."""
    sigma_mid = (sigma.log() + sigma_to.log()).mul(0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, _den(denoise, x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2: Karras's Algorithm 2 with a DPM-Solver-2 midpoint in log sigma (Lu et al. 2022)."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _den(denoise, x, sigma_hat)
        if report(callback, i, sigma_hat, sigmas[i + 1], x, denoised):
            return denoised
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm2_step(denoise, x, d, sigma_hat, sigmas[i + 1])
    return x


def sample_dpm_2_ancestral(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2 step down to sigma_down, then fresh noise up to sigma_next ("DPM2 a")."""
    noise = _gaussian_noise(x, noise)
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(denoise, x, d, sigmas[i], torch.as_tensor(sigma_down, dtype=sigmas.dtype))
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficients(order: int, sigmas: Sequence[float], i: int) -> list[float]:
    """Adams-Bashforth weights in sigma: integral over [sigma_i, sigma_{i+1}] of each Lagrange basis
    polynomial through sigma_i, sigma_{i-1}, ..., sigma_{i-order+1}. Gauss-Legendre with ``order`` nodes is
    exact for these degree order-1 polynomials (no scipy).
    """
    if order - 1 > i:
        raise ValueError(f"LMS order {order} needs {order} past steps, step {i} has {i + 1}")
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sigmas[i], sigmas[i + 1]
    taus = (b - a) / 2 * nodes + (a + b) / 2
    coeffs = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        coeffs.append(float((b - a) / 2 * np.dot(weights, basis)))
    return coeffs


def sample_lms(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the ODE derivative, warming up from order 1 ("LMS")."""
    sigmas_list = sigmas.detach().cpu().double().tolist()
    ds: list[Tensor] = []  # newest last
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        ds = [*ds, to_d(x, sigmas[i], denoised)][-order:]
        coeffs = lms_coefficients(len(ds), sigmas_list, i)
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


def _sigma_of(lam: Tensor) -> Tensor:
    return lam.neg().exp()


def _lam(sigma: Tensor | float) -> Tensor:
    return torch.as_tensor(sigma).log().neg()


def sample_dpmpp_2s_ancestral(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) single-step to sigma_down, then ancestral noise (Lu et al. 2022, Algorithm 1)."""
    noise = _gaussian_noise(x, noise)
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            lam, lam_next = _lam(sigmas[i]), _lam(sigma_down)
            h = lam_next - lam
            s = lam + h / 2
            x_2 = (_sigma_of(s) / _sigma_of(lam)) * x - (-h / 2).expm1() * denoised
            denoised_2 = _den(denoise, x_2, _sigma_of(s))
            x = (_sigma_of(lam_next) / _sigma_of(lam)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ stochastic two-stage step with an intermediate point at lambda + r h ("DPM++ SDE").

    Both stages add ancestral noise from the same Brownian path, so the noise source must be consistent
    over overlapping intervals (a Brownian tree, the default).
    """
    noise = _brownian_noise(x, sigmas, noise)
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        lam, lam_next = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = lam_next - lam
        s = lam + h * r
        # Stage 1: first-order step to lambda_s, deterministic part to sigma_down, noise back up to sigma_s.
        sd, su = get_ancestral_step(_sigma_of(lam), _sigma_of(s), eta)
        s_ = _lam(sd)
        x_2 = (_sigma_of(s_) / _sigma_of(lam)) * x - (lam - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma_of(lam), _sigma_of(s)) * s_noise * su
        denoised_2 = _den(denoise, x_2, _sigma_of(s))
        # Stage 2: the full step with the data prediction extrapolated to second order.
        sd, su = get_ancestral_step(_sigma_of(lam), _sigma_of(lam_next), eta)
        lam_next_ = _lam(sd)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_of(lam_next_) / _sigma_of(lam)) * x - (lam - lam_next_).expm1() * denoised_d
        x = x + noise(_sigma_of(lam), _sigma_of(lam_next)) * s_noise * su
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); first-order on the first and the final step to 0."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        lam, lam_next = _lam(sigmas[i]), _lam(sigmas[i + 1])
        h = lam_next - lam
        denoised_d = denoised
        if old_denoised is not None and sigmas[i + 1] > 0:
            r = (lam - _lam(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) for the SDE (Lu et al. 2022, eq. for SDE-DPM-Solver++2M); eta = 0 is the ODE.

    ``solver_type`` "midpoint" or "heun" selects the second-order correction (both second order).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    step_noise = _brownian_noise(x, sigmas, noise) if eta else None  # None: the ODE, no noise
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        if sigmas[i + 1] == 0:
            x, h = denoised, None
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            eta_h = eta * h
            phi_1 = (-h - eta_h).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + phi_1 * denoised
            if old_denoised is not None and h_last is not None:  # set together, except after the last step
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi_1 / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi_1 * (1 / r) * (denoised - old_denoised)
            if step_noise is not None:
                x = (
                    x
                    + step_noise(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * eta_h).expm1().neg().sqrt()
                    * s_noise
                )
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_3m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep with phi_2, phi_3 corrections; eta = 0 is the ODE."""
    step_noise = _brownian_noise(x, sigmas, noise) if eta else None  # None: the ODE, no noise
    denoised_1: Tensor | None = None  # the previous denoised, then the one before
    denoised_2: Tensor | None = None
    h_1: Tensor | None = None
    h_2: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = _den(denoise, x, sigmas[i])
        if report(callback, i, sigmas[i], sigmas[i + 1], x, denoised):
            return denoised
        if sigmas[i + 1] == 0:
            x, h = denoised, None
        else:
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            # h_k and denoised_k are set together (h_k is None only after the final step to 0).
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None and denoised_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if step_noise is not None:
                x = (
                    x
                    + step_noise(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _restart_segments(sigmas: Tensor, restart_list: dict[float, tuple[int, int, float]] | None):
    """Steps (sigma, sigma_next) with restart loops inserted; A1111's rule when restart_list is None."""
    steps = len(sigmas) - 1
    if restart_list is None:
        # A1111 sd_samplers_extra.restart_sampler: from 20 steps, one (36+: two) restart loops of 9
        # (steps // 4) steps from sigma 0.1 back up to sigma 2.
        restart_list = {}
        if steps >= 20:
            k, times = (steps // 4, 2) if steps >= 36 else (9, 1)
            restart_list = {0.1: (k + 1, times, 2.0)}
    by_index = {int((sigmas - key).abs().argmin()): value for key, value in restart_list.items()}
    segments = []
    for i in range(steps):
        segments.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            n, times, restart_max = by_index[i + 1]
            max_idx = int((sigmas - restart_max).abs().argmin())
            if max_idx < i + 1:
                # Karras spacing from sigmas[max_idx] down to sigmas[i + 1] (Xu et al. 2023, Algorithm 1).
                lo, hi = float(sigmas[i + 1]) ** (1 / 7), float(sigmas[max_idx]) ** (1 / 7)
                ramp = torch.linspace(0, 1, n, dtype=sigmas.dtype)
                loop = (hi + ramp * (lo - hi)) ** 7
                segments += list(zip(loop[:-1], loop[1:], strict=True)) * times
    return segments


def sample_restart(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise: NoiseFn | None = None,
    s_noise: float = 1.0,
    restart_list: dict[float, tuple[int, int, float]] | None = None,
) -> Tensor:
    """Restart sampling (Xu et al. 2023): Heun ODE steps, jumping back up in noise a few times mid-way.

    ``restart_list`` maps sigma_min -> (steps, times, sigma_max) of each restart loop; None uses A1111's
    rule. Unlike A1111, the caller's sigmas are kept (A1111 re-spaces them as Karras with fewer steps).
    """
    noise = _gaussian_noise(x, noise)
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(_restart_segments(sigmas, restart_list)):
        if last_sigma is not None and last_sigma < sigma:  # restart: forward-noise back up to sigma
            x = x + noise(last_sigma, sigma) * s_noise * (sigma**2 - last_sigma**2) ** 0.5
        denoised = _den(denoise, x, sigma)
        if report(callback, i, sigma, sigma_next, x, denoised):
            return denoised
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_2 = x + d * (sigma_next - sigma)
            d_2 = to_d(x_2, sigma_next, _den(denoise, x_2, sigma_next))
            x = x + (d + d_2) / 2 * (sigma_next - sigma)
        last_sigma = sigma_next
    return x
