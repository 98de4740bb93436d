"""The sampler registry: every entry runs, "Automatic" follows A1111, schedule and start-noise rules."""

from __future__ import annotations

import math

import k_diffusion.sampling as kd
import pytest
import torch
from diffusers import DDIMScheduler

from analytic import AnalyticGaussian
from latentforge.sampling import schedules
from latentforge.sampling.denoisers import DiscreteDenoiser
from latentforge.sampling.noise import BrownianNoiseSampler, NoiseSampler, initial_noise
from latentforge.sampling.registry import (
    SAMPLERS,
    get_sampler,
    resolve_schedule,
    sampling_sigmas,
)

ABAR = schedules.alphas_cumprod(schedules.betas("scaled_linear"))
MODEL_SIGMAS = schedules.model_sigmas(ABAR)
GAUSS = AnalyticGaussian(mu=0.5, s=0.7)

# What "Automatic" means in A1111 1.10: the 'scheduler' option of samplers_k_diffusion in
# modules/sd_samplers_kdiffusion.py (no option: the model's own discretisation, "Uniform"); the timestep
# samplers of modules/sd_samplers_timesteps.py (DDIM, PLMS, UniPC) use the CompVis "DDIM" spacing; LCM
# (modules/sd_samplers_lcm.py) has no option. DDPM is not an A1111 sampler: ours, on "Uniform".
A1111_AUTOMATIC = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM++ 2M SDE": "Exponential",
    "DPM++ 2M SDE Heun": "Exponential",
    "DPM++ 2S a": "Karras",
    "DPM++ 3M SDE": "Exponential",
    "Euler a": "Uniform",
    "Euler": "Uniform",
    "LMS": "Uniform",
    "Heun": "Uniform",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "Restart": "Karras",
    "DDIM": "DDIM",
    "PLMS": "DDIM",
    "UniPC": "DDIM",
    "LCM": "Uniform",
    "DDPM": "Uniform",
}
# A1111's 'discard_next_to_last_sigma': True entries.
A1111_DISCARD_PENULTIMATE = {"DPM2", "DPM2 a", "DPM++ 3M SDE"}
# A1111's timestep samplers and diffusers' DDIM/DDPM/PNDM/UniPC start from z_T = noise (init_noise_sigma 1).
VP_START = {"DDIM", "DDPM", "PLMS", "UniPC"}


def _noise_source(kind: str, seeds: list[int], shape: tuple[int, ...], sigmas: torch.Tensor):
    if kind == "gaussian":
        return NoiseSampler(seeds, shape)
    if kind == "brownian":
        positive = sigmas[sigmas > 0]
        return BrownianNoiseSampler(seeds, shape, float(positive.min()), float(positive.max()))
    assert kind == "none"
    return None


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_three_steps(name: str) -> None:
    spec = get_sampler(name)
    denoiser = DiscreteDenoiser(GAUSS.network("epsilon", ABAR), ABAR)
    sigmas = sampling_sigmas(name, "Automatic", 3, denoiser.sigmas).float()  # as the pipeline does
    assert len(sigmas) == 4
    seeds, shape = [3, 4], (4, 8, 8)
    x = spec.initial_latent(initial_noise(seeds, shape), sigmas[0])
    with torch.no_grad():
        out = spec.function(denoiser, x, sigmas, noise=_noise_source(spec.noise, seeds, shape, sigmas))
    assert out.shape == (2, *shape)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert float((out - GAUSS.mu).std()) < 2.0  # a sample near the data scale, not the noise scale


def test_automatic_resolves_to_a1111_defaults() -> None:
    assert set(SAMPLERS) == set(A1111_AUTOMATIC)
    for name, expected in A1111_AUTOMATIC.items():
        assert resolve_schedule(name) == expected, name
        assert resolve_schedule(name, "Automatic") == expected, name
        assert resolve_schedule(name, "Karras") == "Karras"


def test_unknown_schedule_error_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'Karas'") as info:
        resolve_schedule("Euler", "Karas")
    assert all(valid in str(info.value) for valid in schedules.SCHEDULES)


@pytest.mark.parametrize("call", [get_sampler, resolve_schedule])
def test_unknown_sampler_error_lists_valid_names(call) -> None:
    with pytest.raises(ValueError, match="unknown sampler 'Euler b'") as info:
        call("Euler b")
    assert all(valid in str(info.value) for valid in SAMPLERS)


def test_discard_penultimate_flags_match_a1111() -> None:
    assert {n for n, s in SAMPLERS.items() if s.discard_penultimate_sigma} == A1111_DISCARD_PENULTIMATE


@pytest.mark.parametrize("name", sorted(A1111_DISCARD_PENULTIMATE))
@pytest.mark.parametrize("steps", [2, 10, 20])
def test_discard_penultimate_sigma_follows_a1111(name: str, steps: int) -> None:
    """A1111 get_sigmas: one step more from k-diffusion, then torch.cat([sigmas[:-2], sigmas[-1:]])."""
    sigmas = sampling_sigmas(name, "Automatic", steps, MODEL_SIGMAS)
    sigma_min, sigma_max = float(MODEL_SIGMAS[0]), float(MODEL_SIGMAS[-1])
    make = kd.get_sigmas_karras if resolve_schedule(name) == "Karras" else kd.get_sigmas_exponential
    full = make(steps + 1, sigma_min, sigma_max).double()
    assert len(sigmas) == steps + 1
    assert float(sigmas[-1]) == 0.0
    assert float(sigmas[-2]) == pytest.approx(float(full[-3]), rel=1e-6)
    assert float(sigmas[-2]) > float(full[-2])  # sigma_min itself is the one dropped
    torch.testing.assert_close(sigmas, torch.cat([full[:-2], full[-1:]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_start_noise_scale(name: str) -> None:
    """Timestep samplers start at noise * sqrt(1 + sigma^2) (VP z_T = noise), k-samplers at noise * sigma."""
    spec = get_sampler(name)
    assert spec.vp_start == (name in VP_START)
    noise = initial_noise([7], (4, 2, 2), dtype=torch.float64)
    sigma = MODEL_SIGMAS[-1]
    scale = math.sqrt(1 + float(sigma) ** 2) if name in VP_START else float(sigma)
    torch.testing.assert_close(spec.initial_latent(noise, sigma), noise * scale)
    if spec.vp_start:  # what the network sees, x * c_in, is the unit-variance noise itself
        torch.testing.assert_close(spec.initial_latent(noise, sigma) / (1 + sigma**2).sqrt(), noise)


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_final_step_differs_from_diffusers_sd15_default(steps: int) -> None:
    """Our "DDIM" schedule: diffusers' timesteps, but the last step goes to sigma 0 (set_alpha_to_one=True);
    SD1.5's scheduler_config (set_alpha_to_one=False) ends at alphas_cumprod[0], sigma = 0.0292 (ddim.py)."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    sd15 = DDIMScheduler(**config)
    sd15.set_timesteps(steps)
    ours = sampling_sigmas("DDIM", "Automatic", steps, MODEL_SIGMAS)
    assert len(ours) == steps + 1
    torch.testing.assert_close(ours[:-1], MODEL_SIGMAS[sd15.timesteps.long()])  # same timesteps, 901 ... 1
    assert int(sd15.timesteps[-1]) == 1

    def final_sigma(scheduler: DDIMScheduler) -> float:
        abar = float(scheduler.final_alpha_cumprod)
        return math.sqrt((1 - abar) / abar)

    assert float(ours[-1]) == 0.0
    assert final_sigma(DDIMScheduler(**{**config, "set_alpha_to_one": True})) == 0.0
    assert final_sigma(sd15) == pytest.approx(float(MODEL_SIGMAS[0]), rel=1e-4)
    assert final_sigma(sd15) == pytest.approx(0.0292, abs=1e-4)
