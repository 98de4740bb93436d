"""Noise schedules: training betas, the discrete model sigmas, and sampling sigma schedules.

Notation (DDPM, Ho et al. 2020, and Karras et al. 2022 "EDM"):
    beta_t              per-step variance of the forward process, t = 0 .. T-1
    abar_t              alphas_cumprod, prod_{s<=t} (1 - beta_s); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    sigma_t             the equivalent variance-exploding noise level sqrt((1 - abar_t) / abar_t), so that
                        x_t / sqrt(abar_t) = x0 + sigma_t eps
    model_sigmas        the T discrete sigma_t, ascending (index = training timestep)
A sampling schedule is a pure function ``(n, model_sigmas) -> sigmas`` with n + 1 values, descending, the last
one 0 (k-diffusion's convention). The names in ``SCHEDULES`` are AUTOMATIC1111's "Schedule type" labels
(modules/sd_schedulers.py); "Automatic" is not a function: the caller resolves it per sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "AYS_SD15",
    "AYS_SDXL",
    "SCHEDULES",
    "align_your_steps",
    "alphas_cumprod",
    "beta",
    "betas",
    "ddim",
    "exponential",
    "get_schedule",
    "karras",
    "kl_optimal",
    "model_sigmas",
    "normal",
    "polyexponential",
    "rescale_zero_terminal_snr",
    "sgm_uniform",
    "sigma_to_t",
    "simple",
    "t_to_sigma",
    "uniform",
]

# Align Your Steps (Sabour et al. 2024) published 10-step sigmas, as used by A1111's sd_schedulers.py;
# source: https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

# A1111 replaces the zero terminal abar of a zero-terminal-SNR schedule by this value so sigma_max is finite.
A1111_ZTSNR_TERMINAL = 4.8973451890853435e-08


# --------------------------------------------------------------------------------------------------
# Training (beta) schedules
# --------------------------------------------------------------------------------------------------


def betas(kind: str, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Training betas in float64: "linear" (DDPM), "scaled_linear" (Stable Diffusion), "cosine" (IDDPM).

    DDPM's linear schedule is ``betas("linear", 1000, 1e-4, 0.02)``; SD's is the default "scaled_linear".
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        # CompVis ldm/modules/diffusionmodules/util.py make_beta_schedule("linear"): linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008,
        # betas clipped at 0.999 to avoid the singularity at t = T.
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(b, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: 'linear', 'scaled_linear', 'cosine'")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor, terminal: float = 0.0) -> Tensor:
    """Shift and scale sqrt(abar) so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    The last abar becomes ``terminal``: 0 is the paper; sigma-space samplers need a finite sigma_max,
    for which A1111 uses ``A1111_ZTSNR_TERMINAL``.
    """
    sqrt_abar = alphas_cumprod.to(torch.float64).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    out = sqrt_abar**2
    out[-1] = terminal
    return out


def model_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """The discrete VE noise levels sigma_t = sqrt((1 - abar_t) / abar_t), ascending in t, float64."""
    abar = alphas_cumprod.to(torch.float64)
    if bool((abar <= 0).any()):
        raise ValueError(
            "alphas_cumprod contains 0 (zero terminal SNR), so sigma_max would be infinite; "
            "use rescale_zero_terminal_snr(..., terminal=A1111_ZTSNR_TERMINAL)"
        )
    return ((1 - abar) / abar).sqrt()


def sigma_to_t(sigma: Tensor | float, model_sigmas: Tensor) -> Tensor:
    """Continuous timestep for sigma, interpolating linearly in log sigma (k-diffusion DiscreteSchedule).

    Clamped to [0, T-1] outside the trained range.
    """
    log_sigmas = model_sigmas.to(torch.float64).log()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=model_sigmas.device)
    log_sigma = sigma.log()
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(
        0, len(log_sigmas) - 2
    )
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
    return (low + w).reshape(sigma.shape)


def t_to_sigma(t: Tensor | float, model_sigmas: Tensor) -> Tensor:
    """Sigma at a continuous timestep t in [0, T-1], interpolating linearly in log sigma."""
    log_sigmas = model_sigmas.to(torch.float64).log()
    t = torch.as_tensor(t, dtype=torch.float64, device=model_sigmas.device)
    low = t.floor().long().clamp(0, len(log_sigmas) - 1)
    high = t.ceil().long().clamp(0, len(log_sigmas) - 1)
    w = t - t.floor()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# --------------------------------------------------------------------------------------------------
# Sampling (sigma) schedules: (n, model_sigmas) -> n + 1 sigmas, descending, trailing 0
# --------------------------------------------------------------------------------------------------


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _range(model_sigmas: Tensor) -> tuple[float, float]:
    return float(model_sigmas[0]), float(model_sigmas[-1])


def uniform(n: int, model_sigmas: Tensor) -> Tensor:
    """A1111 "Uniform": timesteps linear from T-1 to 0 (k-diffusion DiscreteSchedule.get_sigmas)."""
    t = torch.linspace(len(model_sigmas) - 1, 0, n, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, model_sigmas).to(model_sigmas.dtype))


def normal(n: int, model_sigmas: Tensor) -> Tensor:
    """A1111 "Normal": timesteps linear from t(sigma_max) to t(sigma_min) (ComfyUI normal_scheduler).

    With the model's own sigma range this equals "Uniform"; it is kept as its own name for A1111 parity.
    """
    sigma_min, sigma_max = _range(model_sigmas)
    start, end = sigma_to_t(sigma_max, model_sigmas), sigma_to_t(sigma_min, model_sigmas)
    t = torch.linspace(float(start), float(end), n, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, model_sigmas).to(model_sigmas.dtype))


def sgm_uniform(n: int, model_sigmas: Tensor) -> Tensor:
    """A1111 "SGM Uniform": n + 1 timesteps linear from T-1 to 0, the last dropped (Stability's sgm)."""
    t = torch.linspace(len(model_sigmas) - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(t_to_sigma(t, model_sigmas).to(model_sigmas.dtype))


def karras(n: int, model_sigmas: Tensor, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: linear in sigma^(1/rho) from sigma_max to sigma_min."""
    sigma_min, sigma_max = _range(model_sigmas)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero(((max_inv + ramp * (min_inv - max_inv)) ** rho).to(model_sigmas.dtype))


def exponential(n: int, model_sigmas: Tensor) -> Tensor:
    """Linear in log sigma from sigma_max to sigma_min (k-diffusion get_sigmas_exponential)."""
    sigma_min, sigma_max = _range(model_sigmas)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp().to(model_sigmas.dtype))


def polyexponential(n: int, model_sigmas: Tensor, rho: float = 1.0) -> Tensor:
    """Power rho in log sigma (k-diffusion get_sigmas_polyexponential); rho = 1: exponential."""
    sigma_min, sigma_max = _range(model_sigmas)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_sigmas = ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)
    return _append_zero(log_sigmas.exp().to(model_sigmas.dtype))


def simple(n: int, model_sigmas: Tensor) -> Tensor:
    """A1111/ComfyUI "Simple": every (T/n)-th model sigma counted down from the top."""
    stride = len(model_sigmas) / n
    picks = [len(model_sigmas) - 1 - int(i * stride) for i in range(n)]
    return _append_zero(model_sigmas[picks])


def ddim(n: int, model_sigmas: Tensor) -> Tensor:
    """CompVis/A1111 "DDIM" uniform timestep spacing: t = 1 + k * (T // n), k = 0 .. n-1.

    A1111 (and ComfyUI) keep stepping while t < T, which gives more than n steps when T // n does not
    divide evenly (31 steps for n = 30); we take exactly n, like diffusers' "leading" spacing with SD's
    steps_offset = 1. Both agree whenever len(range(1, T, T // n)) == n (n = 10, 20, 25, 50, ...).
    """
    stride = max(len(model_sigmas) // n, 1)
    picks = [min(1 + k * stride, len(model_sigmas) - 1) for k in range(n)][::-1]
    return _append_zero(model_sigmas[picks])


def beta(n: int, model_sigmas: Tensor, alpha: float = 0.6, beta_: float = 0.6) -> Tensor:
    """A1111 "Beta" (Lee et al. 2024, arXiv:2407.12173): sigma_min + ppf(q) (sigma_max - sigma_min), q 1 -> 0.

    A1111 applies the Beta(0.6, 0.6) quantiles linearly in sigma; ComfyUI applies them to timesteps instead.
    """
    sigma_min, sigma_max = _range(model_sigmas)
    qs = 1 - torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = [sigma_min + _beta_ppf(float(q), alpha, beta_) * (sigma_max - sigma_min) for q in qs]
    return _append_zero(torch.tensor(sigmas, dtype=model_sigmas.dtype))


def align_your_steps(n: int, model_sigmas: Tensor, family_sigmas: Sequence[float] = AYS_SD15) -> Tensor:
    """Align Your Steps (Sabour et al. 2024): the published sigmas, log-linearly interpolated to n steps.

    Independent of ``model_sigmas`` (the published list spans SD's range, down to 0.029 < SD's 0.0292);
    A1111 picks ``AYS_SDXL`` for SDXL models.
    """
    log_ys = torch.tensor(family_sigmas[::-1], dtype=torch.float64).log()  # ascending
    if n == len(family_sigmas):
        return _append_zero(torch.tensor(family_sigmas, dtype=model_sigmas.dtype))
    if n == 1:  # np.interp would give [sigma_min] (A1111 does); one step must start from sigma_max
        return _append_zero(torch.tensor(family_sigmas[:1], dtype=model_sigmas.dtype))
    # np.interp(linspace(0, 1, n), linspace(0, 1, len), log_ys), written out.
    pos = torch.linspace(0, 1, n, dtype=torch.float64) * (len(log_ys) - 1)
    low = pos.floor().long().clamp(0, len(log_ys) - 2)
    w = pos - low
    interp = ((1 - w) * log_ys[low] + w * log_ys[low + 1]).exp().flip(0)
    return _append_zero(interp.to(model_sigmas.dtype))


def kl_optimal(n: int, model_sigmas: Tensor) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, eq. 9): linear in arctan(sigma), from sigma_max to sigma_min.

    As ComfyUI: n values then 0. A1111's version returns n + 1 values ending at sigma_min, without the 0.
    """
    sigma_min, sigma_max = _range(model_sigmas)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    angles = ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)
    return _append_zero(angles.tan().to(model_sigmas.dtype))


ScheduleFn = Callable[[int, Tensor], Tensor]

SCHEDULES: dict[str, ScheduleFn] = {
    "Uniform": uniform,
    "Karras": karras,
    "Exponential": exponential,
    "Polyexponential": polyexponential,
    "SGM Uniform": sgm_uniform,
    "KL Optimal": kl_optimal,
    "Align Your Steps": align_your_steps,
    "Simple": simple,
    "Normal": normal,
    "DDIM": ddim,
    "Beta": beta,
}


def get_schedule(name: str) -> ScheduleFn:
    """Look up a schedule by its A1111 "Schedule type" label; the error lists the valid names."""
    if name == "Automatic":
        raise ValueError("'Automatic' is resolved per sampler by the caller, not a schedule function")
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}") from None


# --------------------------------------------------------------------------------------------------
# Beta distribution quantile without scipy
# --------------------------------------------------------------------------------------------------


def _betainc(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 3rd ed., 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean; use the symmetry
        return 1.0 - _betainc(1.0 - x, b, a)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) in x by bisection (monotone, 80 halvings reach float64 resolution)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
