"""DDIM, DDPM, PLMS, UniPC and LCM on the analytic Gaussian model (exact ODE solution, exact marginals)."""

from __future__ import annotations

import math

import pytest
import torch

from analytic import AnalyticGaussian
from latentforge.sampling import k_samplers, schedules
from latentforge.sampling.ddim import sample_ddim, sample_ddpm
from latentforge.sampling.lcm import boundary_scalings, lcm_schedule, sample_lcm
from latentforge.sampling.plms import sample_plms
from latentforge.sampling.unipc import sample_unipc

GAUSS = AnalyticGaussian(mu=0.5, s=0.7)
MODEL_SIGMAS = schedules.model_sigmas(schedules.alphas_cumprod(schedules.betas("scaled_linear")))
SAMPLERS = {
    "ddim": sample_ddim,
    "ddim_eta1": lambda *a, **k: sample_ddim(*a, eta=1.0, **k),
    "ddpm": sample_ddpm,
    "plms": sample_plms,
    "unipc": sample_unipc,
    "unipc3_bh1": lambda *a, **k: sample_unipc(*a, order=3, variant="bh1", **k),
    "lcm": sample_lcm,
}
DETERMINISTIC = ["ddim", "plms", "unipc", "unipc3_bh1"]


def _ode_error(sampler, steps: int, **options) -> float:
    """Max error against the exact ODE solution, log-uniform sigmas from sigma_max to sigma_min.

    Not the timestep-uniform schedules: near t = 0 SD's sigma(t) ~ sqrt(t + 1), so their last step stays large
    in log sigma as n grows and hides every method's order.
    """
    sigmas = schedules.exponential(steps, MODEL_SIGMAS)[:-1]
    noise = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = GAUSS.prior_sample(noise, float(sigmas[0]))
    exact = GAUSS.ode_solution(x, float(sigmas[0]), float(sigmas[-1]))
    return float((sampler(GAUSS, x, sigmas, **options) - exact).abs().max())


def _order(sampler, steps=(20, 40, 80, 160), **options) -> float:
    """Slope of -log(error) against log(steps), least squares."""
    logs_n = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    logs_e = torch.tensor([math.log(_ode_error(sampler, n, **options)) for n in steps], dtype=torch.float64)
    centred = logs_n - logs_n.mean()
    return float(-(centred * (logs_e - logs_e.mean())).sum() / (centred**2).sum())


def test_ddim_is_first_order() -> None:
    assert 0.85 < _order(sample_ddim) < 1.3


def test_plms_is_at_least_second_order() -> None:
    assert _order(sample_plms) > 1.9


@pytest.mark.parametrize(
    ("order", "variant", "lower_order_final", "minimum"),
    [
        (2, "bh2", True, 2.7),
        (2, "bh1", True, 2.7),
        (3, "bh2", False, 3.5),
        (3, "bh1", False, 3.5),
        (3, "bh2", True, 1.9),
    ],
)
def test_unipc_convergence_order(order: int, variant: str, lower_order_final: bool, minimum: float) -> None:
    """UniP-p with UniC is order p + 1 (Zhao et al. 2023, Theorem 3.1 and Corollary 3.3); lower_order_final
    ends on order-1 and order-2 steps, whose local errors dominate for p = 3 (measured slope ~2.1)."""
    steps = (40, 80, 160, 320) if order == 3 else (20, 40, 80, 160)
    options = dict(order=order, variant=variant, lower_order_final=lower_order_final)
    assert _order(sample_unipc, steps, **options) > minimum


def test_unipc_corrector_and_order_improve_accuracy() -> None:
    errors = [
        _ode_error(sample_unipc, 15, order=1, use_corrector=False),  # DDIM
        _ode_error(sample_unipc, 15, order=2, use_corrector=False),  # UniP-2 only
        _ode_error(sample_unipc, 15, order=2),
    ]
    assert errors[0] > 3 * errors[1] > 3 * errors[2]
    assert errors[0] == pytest.approx(_ode_error(sample_ddim, 15), rel=1e-10)


def test_ddim_eta0_is_euler_and_eta1_is_euler_ancestral_and_ddpm() -> None:
    sigmas = schedules.ddim(12, MODEL_SIGMAS)
    x = GAUSS.prior_sample(torch.randn(8, dtype=torch.float64), float(sigmas[0]))
    draws = [torch.randn(8, dtype=torch.float64) for _ in range(12)]

    def replay():
        queue = list(draws)
        return lambda sigma, sigma_next: queue.pop(0)

    euler = k_samplers.sample_euler(GAUSS, x, sigmas)
    assert torch.allclose(sample_ddim(GAUSS, x, sigmas), euler, rtol=0, atol=1e-12)
    ancestral = k_samplers.sample_euler_ancestral(GAUSS, x, sigmas, noise=replay())
    assert torch.allclose(
        sample_ddim(GAUSS, x, sigmas, eta=1.0, noise=replay()), ancestral, rtol=0, atol=1e-12
    )
    assert torch.allclose(sample_ddpm(GAUSS, x, sigmas, noise=replay()), ancestral, rtol=0, atol=1e-12)
    assert not torch.allclose(sample_ddpm(GAUSS, x, sigmas, noise=replay(), variance="large"), ancestral)


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1"])
def test_ancestral_samples_have_the_data_distribution(name: str) -> None:
    sigmas = torch.cat([MODEL_SIGMAS.flip(0), MODEL_SIGMAS.new_zeros(1)])  # DDPM: all 1000 timesteps
    n = 20000
    x = GAUSS.prior_sample(torch.randn(n, 1, dtype=torch.float64), float(sigmas[0]))
    out = SAMPLERS[name](GAUSS, x, sigmas)
    mean, var = float(out.mean()), float(out.var())
    # 4 standard errors (mean s / sqrt(n), variance s^2 sqrt(2 / n)); the variance also gets 1.5% for the
    # O(1/steps) deficit of the fixed posterior variance (it drops Var[x0 | x_t]; 1.2% at 1000 steps).
    assert abs(mean - GAUSS.mu) < 4 * GAUSS.s / math.sqrt(n)
    assert abs(var - GAUSS.s**2) < GAUSS.s**2 * (4 * math.sqrt(2 / n) + 0.015)


def test_ddpm_large_variance_adds_more_noise_than_small() -> None:
    sigmas = schedules.ddim(50, MODEL_SIGMAS)
    x = GAUSS.prior_sample(torch.randn(20000, 1, dtype=torch.float64), float(sigmas[0]))
    torch.manual_seed(1)
    small = float(sample_ddpm(GAUSS, x, sigmas).var())
    torch.manual_seed(1)
    large = float(sample_ddpm(GAUSS, x, sigmas, variance="large").var())
    assert large > small + 0.05


def test_lcm_boundary_scalings() -> None:
    assert boundary_scalings(0.0) == (1.0, 0.0)
    c_skip, c_out = boundary_scalings(999.0)
    assert c_skip == pytest.approx(0.25 / (9990**2 + 0.25)) and c_out == pytest.approx(1.0, abs=1e-8)
    c_skip, c_out = boundary_scalings(0.01, sigma_data=0.5, timestep_scaling=10.0)
    assert c_skip == pytest.approx(0.25 / 0.26) and c_out == pytest.approx(0.1 / math.sqrt(0.26))


def test_lcm_is_identity_at_the_boundary_and_scales_the_consistency_estimate() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    # t = 0 (sigma_min): f(z, 0) = z whatever the network says.
    sigmas = torch.tensor([float(MODEL_SIGMAS[0]), 0.0], dtype=torch.float64)
    out = sample_lcm(lambda x, sigma: torch.full_like(x, 123.0), x, sigmas)
    assert torch.allclose(out, x / math.sqrt(1 + float(MODEL_SIGMAS[0]) ** 2), rtol=0, atol=1e-15)
    # A consistency-style denoiser (always the same x0 = 2) at t = 19: f = c_out * 2 + c_skip * z.
    sigma = float(MODEL_SIGMAS[19])
    out = sample_lcm(lambda x, s: torch.full_like(x, 2.0), x, torch.tensor([sigma, 0.0], dtype=torch.float64))
    c_skip, c_out = boundary_scalings(19.0)
    assert torch.allclose(out, c_out * 2.0 + c_skip * x / math.sqrt(1 + sigma**2), rtol=0, atol=1e-12)


def test_lcm_renoises_with_the_injected_noise() -> None:
    sigmas = lcm_schedule(4, MODEL_SIGMAS)
    assert [round(float(schedules.sigma_to_t(s, MODEL_SIGMAS))) for s in sigmas[:-1]] == [999, 759, 499, 259]
    seen = []

    def noise(sigma, sigma_next):
        seen.append((float(sigma), float(sigma_next)))
        return torch.zeros(16, dtype=torch.float64)

    x = GAUSS.prior_sample(torch.randn(16, dtype=torch.float64), float(sigmas[0]))
    out = sample_lcm(lambda x, s: torch.full_like(x, 2.0), x, sigmas, noise=noise)
    assert seen == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(3)]
    expected = x
    for t, sigma in zip([999, 759, 499, 259], sigmas[:-1].tolist(), strict=True):
        c_skip, c_out = boundary_scalings(float(t))
        expected = c_out * 2.0 + c_skip * expected / math.sqrt(1 + sigma**2)  # zero noise: x_next = f
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(out, torch.full_like(out, 2.0), rtol=0, atol=1e-9)  # c_skip is not dropped


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_reports_every_step_and_can_stop_early(name: str) -> None:
    sigmas = schedules.ddim(10, MODEL_SIGMAS)
    x = GAUSS.prior_sample(torch.randn(6, dtype=torch.float64), float(sigmas[0]))
    infos = []
    SAMPLERS[name](GAUSS, x, sigmas, callback=infos.append)
    assert [info.i for info in infos] == list(range(10))
    assert all(float(info.sigma) == float(sigmas[info.i]) for info in infos)
    assert all(float(info.sigma_next) == float(sigmas[info.i + 1]) for info in infos)
    stopped = []

    def stop_at_3(info):
        stopped.append(info)
        return info.i == 3

    out = SAMPLERS[name](GAUSS, x, sigmas, callback=stop_at_3)
    assert len(stopped) == 4 and torch.equal(out, stopped[-1].denoised)
    if name != "lcm":  # LCM reports the boundary-scaled consistency estimate instead
        assert torch.allclose(out, GAUSS(stopped[-1].x, stopped[-1].sigma), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "tolerance"), [("ddim", 0.1), ("plms", 5e-3), ("unipc", 2e-3), ("unipc3_bh1", 2e-3)]
)
def test_img2img_suffix_follows_the_ode(name: str, tolerance: float) -> None:
    sigmas = schedules.exponential(40, MODEL_SIGMAS)[:-1]
    start = 25  # the last 15 steps, as img2img at strength ~ 0.4; multistep history must start afresh
    x = GAUSS.prior_sample(torch.randn(32, dtype=torch.float64), float(sigmas[start]))
    exact = GAUSS.ode_solution(x, float(sigmas[start]), float(sigmas[-1]))
    assert float((SAMPLERS[name](GAUSS, x, sigmas[start:]) - exact).abs().max()) < tolerance


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_suffix_of_the_ddim_schedule_is_finite_and_unbiased(name: str) -> None:
    sigmas = schedules.ddim(20, MODEL_SIGMAS)[8:]
    x = GAUSS.prior_sample(torch.randn(4000, dtype=torch.float64), float(sigmas[0]))
    out = SAMPLERS[name](GAUSS, x, sigmas)
    assert torch.isfinite(out).all() and abs(float(out.mean()) - GAUSS.mu) < 0.05


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_finite_in_bfloat16(name: str) -> None:
    sigmas = schedules.karras(8, MODEL_SIGMAS).to(torch.float32)
    x = (torch.randn(2, 4, 8, 8) * float(sigmas[0])).to(torch.bfloat16)
    out = SAMPLERS[name](GAUSS, x, sigmas)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert abs(float(out.float().mean()) - GAUSS.mu) < 0.2


@pytest.mark.parametrize("name", ["ddim_eta1", "ddpm", "lcm"])
def test_noise_is_drawn_only_for_steps_to_a_positive_sigma(name: str) -> None:
    sigmas = schedules.ddim(6, MODEL_SIGMAS)
    calls = []

    def noise(sigma, sigma_next):
        calls.append(float(sigma_next))
        return torch.zeros(5, dtype=torch.float64)

    SAMPLERS[name](GAUSS, torch.randn(5, dtype=torch.float64) * float(sigmas[0]), sigmas, noise=noise)
    assert calls == [float(s) for s in sigmas[1:-1]]


def test_invalid_options_are_explained() -> None:
    sigmas = schedules.ddim(4, MODEL_SIGMAS)
    x = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="bh1"):
        sample_unipc(GAUSS, x, sigmas, variant="bh3")
    with pytest.raises(ValueError, match="small"):
        sample_ddpm(GAUSS, x, sigmas, variance="learned")
    with pytest.raises(ValueError, match="original_steps"):
        lcm_schedule(60, MODEL_SIGMAS)
