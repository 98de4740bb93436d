"""Parity with k-diffusion (the reference implementation): samplers, schedules and discrete denoisers.

Same float64 analytic denoiser, same sigmas, and the same injected noise: our seeded Brownian noise
sampler is a deterministic function of (sigma, sigma_next), so handing one instance to both sides gives
both exactly the same noise whatever order they query it in.
"""

import k_diffusion as kd
import pytest
import torch

from analytic import AnalyticGaussian
from latentforge.sampling import k_samplers as K
from latentforge.sampling import schedules as S
from latentforge.sampling.denoisers import DiscreteDenoiser
from latentforge.sampling.noise import BrownianNoiseSampler

G = AnalyticGaussian(mu=0.3, s=0.7)
AC = S.alphas_cumprod(S.betas("scaled_linear"))
MS = S.model_sigmas(AC)
TOL = 1e-5

# name -> (our options, whether k-diffusion's function takes a noise_sampler)
SAMPLERS = {
    "euler": ({}, False),
    "euler_ancestral": ({}, True),
    "heun": ({}, False),
    "dpm_2": ({}, False),
    "dpm_2_ancestral": ({}, True),
    "lms": ({}, False),
    "dpmpp_2s_ancestral": ({}, True),
    "dpmpp_sde": ({}, True),
    "dpmpp_2m": ({}, False),
    "dpmpp_2m_sde": ({}, True),
    "dpmpp_2m_sde heun": ({"solver_type": "heun"}, True),
    "dpmpp_3m_sde": ({}, True),
    "dpmpp_3m_sde eta=0.5": ({"eta": 0.5}, True),
    "euler_ancestral eta=0.3 s_noise=0.9": ({"eta": 0.3, "s_noise": 0.9}, True),
}


def _kmodel(x, sigma, **kwargs):
    return G(x, sigma)


@pytest.mark.parametrize("schedule", ["Karras", "Exponential", "Uniform"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_matches_k_diffusion(name, schedule):
    options, takes_noise = SAMPLERS[name]
    fn_name = "sample_" + name.split(" ")[0]
    sigmas = S.get_schedule(schedule)(12, MS)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    extra = {}
    if takes_noise:
        extra = {"noise_sampler": BrownianNoiseSampler(range(4), (3, 5), 0.02, 15.0, dtype=torch.float64)}
    ref = getattr(kd.sampling, fn_name)(_kmodel, x, sigmas, disable=True, **options, **extra)
    ours = getattr(K, fn_name)(G, x, sigmas, noise=extra.get("noise_sampler"), **options)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_multistep_img2img_suffix_matches_k_diffusion(name):
    sigmas = S.karras(20, MS)[8:]
    x = G.prior_sample(
        torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), 2.0
    )
    noise = BrownianNoiseSampler(range(4), (6,), 0.02, 15.0, dtype=torch.float64)
    extra = {"noise_sampler": noise} if "sde" in name else {}
    ref = getattr(kd.sampling, "sample_" + name)(_kmodel, x, sigmas, disable=True, **extra)
    ours = getattr(K, "sample_" + name)(G, x, sigmas, noise=extra.get("noise_sampler"))
    assert (ours - ref).abs().max().item() <= TOL


def test_churn_matches_k_diffusion_with_the_same_gaussian_noise():
    # k-diffusion draws torch.randn_like(x) on every step even when gamma = 0; with s_tmin = 0 and
    # s_tmax = inf gamma > 0 on every step, so feeding our sampler the same global-RNG stream matches.
    sigmas = S.karras(10, MS)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    for fn in ("sample_euler", "sample_heun", "sample_dpm_2"):
        torch.manual_seed(123)
        ref = getattr(kd.sampling, fn)(_kmodel, x, sigmas, disable=True, s_churn=5.0, s_noise=1.003)
        torch.manual_seed(123)
        ours = getattr(K, fn)(G, x, sigmas, s_churn=5.0, s_noise=1.003)
        assert (ours - ref).abs().max().item() <= TOL, fn


def test_schedules_match_k_diffusion():
    s_min, s_max = float(MS[0]), float(MS[-1])
    for n in (1, 5, 20, 33):
        ref = kd.sampling.get_sigmas_karras(n, s_min, s_max).double()
        assert torch.allclose(S.karras(n, MS), ref, rtol=1e-6, atol=0)
        # k-diffusion builds these in float32; compare at float32 resolution
        ref = kd.sampling.get_sigmas_exponential(n, s_min, s_max).double()
        assert torch.allclose(S.exponential(n, MS), ref, rtol=1e-6, atol=0)
        ref = kd.sampling.get_sigmas_polyexponential(n, s_min, s_max, rho=1.0).double()
        assert torch.allclose(S.polyexponential(n, MS), ref, rtol=1e-6, atol=0)
        ref = kd.sampling.get_sigmas_polyexponential(n, s_min, s_max, rho=2.5).double()
        assert torch.allclose(S.polyexponential(n, MS, rho=2.5), ref, rtol=1e-6, atol=0)


def test_uniform_schedule_and_timesteps_match_discrete_model():
    wrapped = kd.external.DiscreteEpsDDPMDenoiser(lambda x, t, **kw: x, AC, quantize=False)
    for n in (1, 7, 20, 50):
        # k-diffusion casts t to float32 before interpolating
        assert torch.allclose(S.uniform(n, MS), wrapped.get_sigmas(n).double(), rtol=1e-6, atol=0)
    sigma = torch.tensor([0.01, 0.0291671, 0.05, 0.3, 1.0, 7.7, 14.6146, 20.0], dtype=torch.float64)
    assert torch.allclose(S.sigma_to_t(sigma, MS), wrapped.sigma_to_t(sigma), rtol=0, atol=1e-9)
    t = torch.tensor([0.0, 0.5, 10.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(S.t_to_sigma(t, MS), wrapped.t_to_sigma(t).double(), rtol=1e-6, atol=0)


def _net(x_in, t, cond=None):
    """A smooth non-invertible stand-in for a U-Net: any mistake in c_in, t or c_out shows."""
    return torch.sin(3 * x_in + t.reshape(-1, *([1] * (x_in.ndim - 1))) / 250) + 0.1 * x_in


@pytest.mark.parametrize(
    "prediction,reference", [("epsilon", "DiscreteEpsDDPMDenoiser"), ("v", "DiscreteVDDPMDenoiser")]
)
def test_discrete_denoiser_matches_k_diffusion(prediction, reference):
    ref = getattr(kd.external, reference)(lambda x, t, **kw: _net(x, t), AC, quantize=False)
    ours = DiscreteDenoiser(_net, AC, prediction)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    sigma = torch.tensor([0.03, 0.2, 1.0, 5.0, 14.6], dtype=torch.float64)
    assert (ours(x, sigma) - ref(x, sigma)).abs().max().item() <= TOL
    # float32 end to end, as a real model runs
    x32, s32 = x.float(), sigma.float()
    ref32 = getattr(kd.external, reference)(lambda x, t, **kw: _net(x, t), AC.float(), quantize=False)
    assert (
        DiscreteDenoiser(_net, AC.float(), prediction)(x32, s32) - ref32(x32, s32)
    ).abs().max().item() <= 1e-4
