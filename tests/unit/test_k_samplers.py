"""k-diffusion-family samplers and seeded noise on the analytic Gaussian model (float64, exact answers)."""

import math

import pytest
import torch

from analytic import AnalyticGaussian
from latentforge.sampling import k_samplers as K
from latentforge.sampling import schedules as S
from latentforge.sampling.common import StepInfo, get_ancestral_step
from latentforge.sampling.noise import BrownianNoiseSampler, NoiseSampler, generators, initial_noise

G = AnalyticGaussian(mu=0.3, s=0.5)
MS = S.model_sigmas(S.alphas_cumprod(S.betas("scaled_linear")))
RANGE = torch.tensor([0.03, 15.0], dtype=torch.float64)  # sigma_min, sigma_max for S.karras
X0 = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

# (sampler, options, expected global order range); the multistep ones warm up with a first-order
# step, which caps their observed order at about 2 (LMS's first step error is small here, so ~3.5).
DETERMINISTIC = {
    "euler": (K.sample_euler, {}, (0.95, 1.1)),
    "euler_ancestral eta=0": (K.sample_euler_ancestral, {"eta": 0.0}, (0.95, 1.1)),
    "heun": (K.sample_heun, {}, (1.9, 2.3)),
    "dpm_2": (K.sample_dpm_2, {}, (1.9, 2.3)),
    "dpm_2_ancestral eta=0": (K.sample_dpm_2_ancestral, {"eta": 0.0}, (1.9, 2.3)),
    "lms": (K.sample_lms, {}, (3.0, 4.5)),
    "lms order 2": (K.sample_lms, {"order": 2}, (1.9, 2.3)),
    "dpmpp_2s_ancestral eta=0": (K.sample_dpmpp_2s_ancestral, {"eta": 0.0}, (1.9, 2.3)),
    "dpmpp_sde eta=0": (K.sample_dpmpp_sde, {"eta": 0.0}, (1.9, 2.3)),
    "dpmpp_2m": (K.sample_dpmpp_2m, {}, (1.9, 2.3)),
    "dpmpp_2m_sde eta=0": (K.sample_dpmpp_2m_sde, {"eta": 0.0}, (1.9, 2.3)),
    "dpmpp_2m_sde heun eta=0": (K.sample_dpmpp_2m_sde, {"eta": 0.0, "solver_type": "heun"}, (1.9, 2.3)),
    "dpmpp_3m_sde eta=0": (K.sample_dpmpp_3m_sde, {"eta": 0.0}, (1.7, 2.3)),
    "restart without restarts": (K.sample_restart, {"restart_list": {}}, (1.9, 2.3)),
}


def _ode_error(fn, options, n):
    # End at sigma_min, not 0: the final jump sigma_min -> 0 has a fixed size, so it would put a floor
    # under the error that does not shrink with n.
    sigmas = S.karras(n, RANGE)[:-1]
    x = X0 * sigmas[0]
    out = fn(G, x, sigmas, **options)
    return (out - G.ode_solution(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item()


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_sampler_converges_at_its_order(name):
    fn, options, (lo, hi) = DETERMINISTIC[name]
    ns = [16, 32, 64]
    errs = [_ode_error(fn, options, n) for n in ns]
    # least-squares slope of log error against log steps
    xs, ys = [math.log(n) for n in ns], [math.log(e) for e in errs]
    mx, my = sum(xs) / 3, sum(ys) / 3
    order = -sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
    assert lo <= order <= hi, (errs, order)
    assert errs[-1] < 5e-2


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_sampler_final_step_to_zero(name):
    fn, options, _ = DETERMINISTIC[name]
    sigmas = S.karras(100, MS)
    x = X0 * sigmas[0]
    to_zero = (fn(G, x, sigmas, **options) - G.ode_solution(x, float(sigmas[0]), 0.0)).abs().max()
    to_min = (
        (fn(G, x, sigmas[:-1], **options) - G.ode_solution(x, float(sigmas[0]), float(sigmas[-2])))
        .abs()
        .max()
    )
    # the last jump sigma_min = 0.029 -> 0 is one first-order step: adds about 1e-3 * |x - mu|
    assert to_zero < to_min + 3e-3


def test_eta_zero_ancestral_equals_deterministic_exactly():
    sigmas = S.karras(10, MS)
    x = X0 * sigmas[0]
    assert torch.equal(K.sample_euler_ancestral(G, x, sigmas, eta=0.0), K.sample_euler(G, x, sigmas))
    assert torch.equal(K.sample_dpm_2_ancestral(G, x, sigmas, eta=0.0), K.sample_dpm_2(G, x, sigmas))
    assert torch.equal(K.sample_restart(G, x, sigmas, restart_list={}), K.sample_heun(G, x, sigmas))


# (sampler, options, steps, relative tolerance on the variance: weak first-order samplers need more steps)
STOCHASTIC = {
    "euler_ancestral": (K.sample_euler_ancestral, {}, 400, 0.04),
    "euler churn": (K.sample_euler, {"s_churn": 10.0}, 400, 0.04),
    "dpm_2_ancestral": (K.sample_dpm_2_ancestral, {}, 100, 0.025),
    "dpmpp_2s_ancestral": (K.sample_dpmpp_2s_ancestral, {}, 100, 0.025),
    "dpmpp_2m_sde": (K.sample_dpmpp_2m_sde, {}, 100, 0.025),
    "dpmpp_2m_sde heun": (K.sample_dpmpp_2m_sde, {"solver_type": "heun"}, 100, 0.025),
    "dpmpp_3m_sde": (K.sample_dpmpp_3m_sde, {}, 100, 0.025),
    "restart": (K.sample_restart, {}, 40, 0.025),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_sampler_matches_data_distribution(name):
    fn, options, n, tol = STOCHASTIC[name]
    sigmas = S.karras(n, MS)
    seeds, shape = list(range(200)), (160,)  # 32,000 scalars: std error of the variance ~0.8 %
    x = G.prior_sample(initial_noise(seeds, shape, dtype=torch.float64), float(sigmas[0]))
    out = fn(G, x, sigmas, noise=NoiseSampler(seeds, shape, dtype=torch.float64), **options)
    assert out.mean().item() == pytest.approx(G.mu, abs=0.015)
    assert out.var().item() == pytest.approx(G.s**2, rel=tol)


def test_dpmpp_sde_with_brownian_noise_matches_data_distribution():
    sigmas = S.karras(30, MS)
    seeds, shape = list(range(100)), (320,)
    x = G.prior_sample(initial_noise(seeds, shape, dtype=torch.float64), float(sigmas[0]))
    noise = BrownianNoiseSampler(seeds, shape, float(sigmas[-2]), float(sigmas[0]), dtype=torch.float64)
    out = K.sample_dpmpp_sde(G, x, sigmas, noise=noise)
    assert out.mean().item() == pytest.approx(G.mu, abs=0.015)
    assert out.var().item() == pytest.approx(G.s**2, rel=0.03)


def test_ancestral_eta_one_is_not_deterministic():
    sigmas = S.karras(10, MS)
    x = X0 * sigmas[0]
    noisy = K.sample_euler_ancestral(G, x, sigmas, noise=NoiseSampler([1] * 16, (4,), dtype=torch.float64))
    assert (noisy - K.sample_euler(G, x, sigmas)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["lms", "dpmpp_2m", "dpmpp_3m_sde eta=0", "heun"])
def test_img2img_suffix_of_the_schedule(name):
    fn, options, _ = DETERMINISTIC[name]
    sigmas = S.karras(64, RANGE)[:-1]
    suffix = sigmas[20:]
    x = G.prior_sample(X0, float(suffix[0]))  # a "noised image" at the first sigma of the suffix
    out = fn(G, x, suffix, **options)
    assert (out - G.ode_solution(x, float(suffix[0]), float(suffix[-1]))).abs().max() < 5e-3


ALL = {
    "Euler a": K.sample_euler_ancestral,
    "Euler": K.sample_euler,
    "LMS": K.sample_lms,
    "Heun": K.sample_heun,
    "DPM2": K.sample_dpm_2,
    "DPM2 a": K.sample_dpm_2_ancestral,
    "DPM++ 2S a": K.sample_dpmpp_2s_ancestral,
    "DPM++ 2M": K.sample_dpmpp_2m,
    "DPM++ SDE": K.sample_dpmpp_sde,
    "DPM++ 2M SDE": K.sample_dpmpp_2m_sde,
    "DPM++ 3M SDE": K.sample_dpmpp_3m_sde,
    "Restart": K.sample_restart,
}


@pytest.mark.parametrize("sampler", list(ALL))
def test_callback_once_per_step_and_early_stop(sampler):
    fn = ALL[sampler]
    sigmas = S.karras(8, MS)
    x = X0 * sigmas[0]

    def noise():
        return NoiseSampler(list(range(16)), (4,), dtype=torch.float64)

    seen: list[StepInfo] = []
    fn(G, x, sigmas, callback=seen.append, noise=noise())
    assert [s.i for s in seen] == list(range(8))
    assert [float(s.sigma_next) for s in seen][-1] == 0.0
    assert all(isinstance(s, StepInfo) and s.x.shape == x.shape for s in seen)

    stop = fn(G, x, sigmas, callback=lambda info: info.i == 2, noise=noise())
    assert torch.equal(stop, G(seen[2].x, seen[2].sigma))


def test_restart_inserts_loops_by_a1111_rule():
    sigmas = S.karras(20, MS)
    seen: list[StepInfo] = []
    K.sample_restart(G, X0 * sigmas[0], sigmas, callback=seen.append, noise=NoiseSampler([0] * 16, (4,)))
    assert len(seen) == 20 + 9  # one loop of 9 steps from sigma ~2 back down to ~0.1
    jumps = [i for i in range(1, len(seen)) if seen[i].sigma > seen[i - 1].sigma]
    assert len(jumps) == 1
    assert float(seen[jumps[0]].sigma) == pytest.approx(float(sigmas[(sigmas - 2).abs().argmin()]))


def test_lms_coefficients_integrate_polynomials_exactly():
    sig = [14.0, 9.0, 5.5, 3.0, 1.7]
    for order in (1, 2, 3, 4):
        c = K.lms_coefficients(order, sig, 3)
        assert sum(c) == pytest.approx(sig[4] - sig[3], rel=1e-12)
        # derivative f(s) = s^(order-1) sampled at sig[3], sig[2], ...: the rule integrates it exactly
        approx = sum(cj * sig[3 - j] ** (order - 1) for j, cj in enumerate(c))
        assert approx == pytest.approx((sig[4] ** order - sig[3] ** order) / order, rel=1e-12)
    with pytest.raises(ValueError, match="order"):
        K.lms_coefficients(4, sig, 1)


def test_get_ancestral_step():
    down, up = get_ancestral_step(2.0, 1.0, eta=1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    assert up == pytest.approx(math.sqrt(1.0 * (4.0 - 1.0) / 4.0))
    assert get_ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)


def test_sampler_errors():
    with pytest.raises(ValueError, match="midpoint"):
        K.sample_dpmpp_2m_sde(G, X0, S.karras(3, MS), solver_type="rk4")


# ---------------------------------------------------------------------------------------------- noise


def test_initial_noise_is_per_image_generator_and_dtype_independent():
    x = initial_noise([7, 8], (2, 3))
    assert torch.equal(x[1], torch.randn((2, 3), generator=torch.Generator().manual_seed(8)))
    assert torch.equal(initial_noise([8], (2, 3))[0], x[1])  # independent of batch composition
    assert torch.equal(initial_noise([7, 8], (2, 3), dtype=torch.float16), x.half())
    assert torch.equal(initial_noise(generators([7, 8]), (2, 3)), x)


def test_noise_sampler_continues_the_initial_generator_like_diffusers():
    # diffusers' randn_tensor with a generator list draws image i's initial latents and then each step's
    # noise from generator i, in that order.
    g = torch.Generator().manual_seed(3)
    first, second, third = (torch.randn((1, 2, 3), generator=g) for _ in range(3))
    ns = NoiseSampler([5, 3], (2, 3))
    assert torch.equal(ns(1.0, 0.5)[1], second[0])
    assert torch.equal(ns(0.5, 0.2)[1], third[0])
    gens = generators([3])
    assert torch.equal(initial_noise(gens, (2, 3))[0], first[0])
    assert torch.equal(NoiseSampler(gens, (2, 3))(1.0, 0.5)[0], second[0])


@pytest.mark.parametrize("stochastic", ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ 2M SDE"])
def test_batch_equals_single_images(stochastic):
    fn = ALL[stochastic]
    sigmas, seeds, shape = S.karras(6, MS), [11, 12, 13], (5,)
    batch = fn(
        G,
        initial_noise(seeds, shape, dtype=torch.float64) * sigmas[0],
        sigmas,
        noise=NoiseSampler(seeds, shape, dtype=torch.float64),
    )
    for i, seed in enumerate(seeds):
        one = fn(
            G,
            initial_noise([seed], shape, dtype=torch.float64) * sigmas[0],
            sigmas,
            noise=NoiseSampler([seed], shape, dtype=torch.float64),
        )
        assert torch.allclose(batch[i], one[0], rtol=0, atol=1e-14)


def test_brownian_noise_is_a_consistent_brownian_motion():
    seeds, shape = list(range(400)), (50,)
    bm = BrownianNoiseSampler(seeds, shape, 0.03, 14.6, dtype=torch.float64)
    a, b, c = 10.0, 2.0, 0.3
    ab, bc, ac = bm(a, b), bm(b, c), bm(a, c)
    # increments add up: W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b))
    assert torch.allclose(ac * math.sqrt(a - c), ab * math.sqrt(a - b) + bc * math.sqrt(b - c), atol=1e-12)
    for z in (ab, bc):  # unit variance, disjoint increments independent (20,000 samples)
        assert z.mean().item() == pytest.approx(0.0, abs=0.03)
        assert z.var().item() == pytest.approx(1.0, rel=0.04)
    assert (ab * bc).mean().item() == pytest.approx(0.0, abs=0.03)
    # overlapping increments have the Brownian correlation sqrt(|ab| / |ac|)
    assert (ab * ac).mean().item() == pytest.approx(math.sqrt((a - b) / (a - c)), abs=0.03)
    # reproducible, independent of the rest of the batch, query order and direction
    again = BrownianNoiseSampler([seeds[7]], shape, 0.03, 14.6, dtype=torch.float64)
    assert torch.equal(again(b, c)[0], bc[7])
    assert torch.allclose(again(c, b)[0], -bc[7], atol=1e-14)
    # small intervals inside one leaf still have unit variance
    fine = bm(1.0, 1.0 - 1e-7)
    assert fine.var().item() == pytest.approx(1.0, rel=0.04)
