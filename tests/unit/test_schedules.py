"""Schedules (betas, model sigmas, sampling sigmas) and the discrete denoiser wrapper."""

import math

import pytest
import torch

from analytic import AnalyticGaussian
from latentforge.sampling import schedules as S
from latentforge.sampling.denoisers import DiscreteDenoiser

AC = S.alphas_cumprod(S.betas("scaled_linear"))
MS = S.model_sigmas(AC)


@pytest.mark.parametrize("name", list(S.SCHEDULES))
@pytest.mark.parametrize("n", [1, 2, 7, 10, 11, 30])
def test_schedule_shape_monotone_trailing_zero(name, n):
    sigmas = S.get_schedule(name)(n, MS)
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1] == 0
    assert bool((sigmas[:-1] > sigmas[1:]).all()), sigmas
    assert bool((sigmas[:-1] > 0).all())
    tol = 1e-2 if name == "Align Your Steps" else 1e-12  # a published list, not the model's range
    assert float(sigmas[0]) <= float(MS[-1]) * (1 + tol)
    assert float(sigmas[-2]) >= float(MS[0]) * (1 - tol)


@pytest.mark.parametrize(
    "name", ["Uniform", "Karras", "Exponential", "Polyexponential", "KL Optimal", "Beta"]
)
def test_schedule_endpoints_are_model_range(name):
    sigmas = S.get_schedule(name)(12, MS)
    assert float(sigmas[0]) == pytest.approx(float(MS[-1]), rel=1e-12)
    assert float(sigmas[-2]) == pytest.approx(float(MS[0]), rel=1e-12)


def test_n_equals_one_is_sigma_max_then_zero():
    for name in [
        "Align Your Steps",
        "Uniform",
        "Karras",
        "Exponential",
        "Normal",
        "KL Optimal",
        "Beta",
        "SGM Uniform",
    ]:
        sigmas = S.get_schedule(name)(1, MS)
        assert sigmas.tolist() == pytest.approx([float(MS[-1]), 0.0], rel=1e-4), name


def test_karras_formula():
    sigmas = S.karras(5, MS, rho=7.0)
    s_min, s_max = float(MS[0]), float(MS[-1])
    for i in range(5):
        want = (s_max ** (1 / 7) + i / 4 * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
        assert float(sigmas[i]) == pytest.approx(want, rel=1e-12)


def test_simple_and_ddim_pick_model_sigmas():
    assert S.simple(10, MS)[:-1].tolist() == MS[[999, 899, 799, 699, 599, 499, 399, 299, 199, 99]].tolist()
    assert S.ddim(10, MS)[:-1].tolist() == MS[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]].tolist()
    assert S.ddim(30, MS)[0] == MS[1 + 29 * 33]  # exactly n steps (A1111 would take 31)


def test_align_your_steps_published_list_and_interpolation():
    assert S.align_your_steps(11, MS)[:-1].tolist() == pytest.approx(list(S.AYS_SD15))
    s21 = S.align_your_steps(21, MS)
    assert s21[:-1][::2].tolist() == pytest.approx(list(S.AYS_SD15), rel=1e-12)
    # midpoints are geometric means of the neighbours (log-linear interpolation)
    assert float(s21[1]) == pytest.approx(math.sqrt(S.AYS_SD15[0] * S.AYS_SD15[1]), rel=1e-12)


def test_beta_quantile_matches_scipy():
    import scipy.stats as stats

    for q in [1e-6, 0.01, 0.3, 0.5, 0.77, 0.999]:
        assert S._beta_ppf(q, 0.6, 0.6) == pytest.approx(stats.beta.ppf(q, 0.6, 0.6), abs=1e-12)
    assert S._beta_ppf(0.4, 2.0, 5.0) == pytest.approx(stats.beta.ppf(0.4, 2.0, 5.0), abs=1e-12)


def test_get_schedule_errors_list_names():
    with pytest.raises(ValueError, match="Karras"):
        S.get_schedule("karras-typo")
    with pytest.raises(ValueError, match="per sampler"):
        S.get_schedule("Automatic")


def test_betas_kinds():
    lin = S.betas("linear", 1000, 1e-4, 0.02)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    sl = S.betas("scaled_linear")
    assert sl.dtype == torch.float64
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    assert float(sl[500]) ** 0.5 == pytest.approx((0.00085**0.5 + 0.012**0.5) / 2, rel=1e-3)
    cos = S.betas("cosine", 1000)
    abar = S.alphas_cumprod(cos)
    want = (
        math.cos((500 / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    )
    assert float(abar[499]) == pytest.approx(want, rel=1e-9)
    assert float(cos.max()) <= 0.999
    with pytest.raises(ValueError, match="scaled_linear"):
        S.betas("quadratic")


def test_rescale_zero_terminal_snr():
    abar = S.rescale_zero_terminal_snr(AC)
    assert abar[-1] == 0
    assert float(abar[0]) == pytest.approx(float(AC[0]), rel=1e-12)
    assert bool((abar[1:] < abar[:-1]).all())
    with pytest.raises(ValueError, match="terminal"):
        S.model_sigmas(abar)
    finite = S.model_sigmas(S.rescale_zero_terminal_snr(AC, terminal=S.A1111_ZTSNR_TERMINAL))
    assert float(finite[-1]) == pytest.approx(4518.8, rel=1e-3)


def test_model_sigmas_ascending_and_sd_range():
    assert bool((MS[1:] > MS[:-1]).all())
    assert float(MS[0]) == pytest.approx(0.0291671, rel=1e-5)
    assert float(MS[-1]) == pytest.approx(14.614642, rel=1e-6)


def test_sigma_t_round_trip():
    t = torch.tensor([0.0, 0.25, 1.5, 400.0, 731.9, 998.999, 999.0], dtype=torch.float64)
    assert torch.allclose(S.sigma_to_t(S.t_to_sigma(t, MS), MS), t, rtol=0, atol=1e-9)
    assert torch.allclose(S.t_to_sigma(torch.arange(1000.0), MS), MS, rtol=1e-14, atol=0)
    # integer sigmas map to integer timesteps; out of range clamps
    assert S.sigma_to_t(MS[123], MS).item() == pytest.approx(123, abs=1e-9)
    assert S.sigma_to_t(torch.tensor([1e-3, 1e3]), MS).tolist() == [0.0, 999.0]
    # log-linear between neighbours
    mid = (MS[10] * MS[11]).sqrt()
    assert S.sigma_to_t(mid, MS).item() == pytest.approx(10.5, abs=1e-9)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_denoiser_prediction_types_give_the_exact_x0(prediction):
    g = AnalyticGaussian(mu=0.3, s=0.7)
    x = torch.randn(5, 2, 3, dtype=torch.float64) * 3
    sigma = torch.tensor([0.05, 0.5, 2.0, 9.0, 14.0], dtype=torch.float64)
    den = DiscreteDenoiser(g.network(prediction, AC), AC, prediction)
    assert (den(x, sigma) - g(x, sigma)).abs().max() < 1e-12
    # scalar sigma broadcasts over the batch
    assert (den(x, 2.0) - g(x, 2.0)).abs().max() < 1e-12


def test_denoiser_prediction_types_differ_when_misdeclared():
    g = AnalyticGaussian(mu=0.3, s=0.7)
    x = torch.randn(4, 3, dtype=torch.float64)
    wrong = DiscreteDenoiser(g.network("v", AC), AC, "epsilon")
    assert (wrong(x, 1.0) - g(x, 1.0)).abs().max() > 1e-2


def test_denoiser_passes_scaled_input_and_timestep_and_keeps_dtype():
    seen = {}

    def model(x_in, t, cond):
        seen.update(x_in=x_in, t=t, cond=cond)
        return torch.zeros_like(x_in)

    den = DiscreteDenoiser(model, AC.float(), "epsilon")
    x = torch.ones(2, 4, dtype=torch.float16)
    out = den(x, torch.tensor([MS[0].item(), MS[500].item()]), cond={"crossattn": 1})
    assert out.dtype == torch.float16 and torch.equal(out, x)
    assert seen["t"].dtype == torch.float32
    assert seen["t"].tolist() == pytest.approx([0.0, 500.0], abs=1e-3)
    assert float(seen["x_in"][1, 0]) == pytest.approx(1 / math.sqrt(float(MS[500]) ** 2 + 1), rel=1e-3)
    assert seen["cond"] == {"crossattn": 1}
    # float32 alphas_cumprod near 1 loses digits in 1 - abar
    assert den.sigma_min == pytest.approx(float(MS[0]), rel=1e-4)
    assert den.sigma_max == pytest.approx(float(MS[-1]), rel=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        DiscreteDenoiser(model, AC, "eps")
