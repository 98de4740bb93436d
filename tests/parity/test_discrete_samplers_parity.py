"""DDIM, DDPM, PLMS, UniPC and LCM against diffusers' schedulers driven through their full loops.

Both sides see the same eps-network (the analytic Gaussian's exact eps plus a fixed random nonlinear term),
the same float64 noise and SD1.5's scheduler config; we receive the sigmas of diffusers' timesteps. The
schedulers' alphas_cumprod/sigmas are cast to float64 after set-up so the comparison is not limited by
their float32 buffers. A1111's timestep samplers (not importable) are transcribed in VP form below.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler

from latentforge.sampling import schedules
from latentforge.sampling.ddim import sample_ddim, sample_ddpm
from latentforge.sampling.denoisers import DiscreteDenoiser
from latentforge.sampling.lcm import lcm_schedule, sample_lcm
from latentforge.sampling.plms import sample_plms
from latentforge.sampling.unipc import sample_unipc

SD15 = dict(  # runwayml/stable-diffusion-v1-5 scheduler_config.json
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)
SHAPE = (2, 4, 3, 3)
TOL = 1e-10  # float64 throughout; the brief's 1e-5 bound is far looser


def _abar(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float64)


def _to_float64(scheduler) -> None:
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(torch.float64)


def eps_network(abar: torch.Tensor, mu: float = 0.3, s: float = 0.8):
    """model(z_t, t) -> eps at integer timestep round(t): exact Gaussian eps plus a fixed tanh channel mix."""
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64) / 2

    def model(z: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).round().long().reshape(-1)
        a = abar[t].reshape(-1, 1, 1, 1) if t.numel() > 1 else abar[t[0]]
        x0 = mu + s**2 * a.sqrt() / (a * s**2 + 1 - a) * (z - a.sqrt() * mu)
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        wobble = torch.tanh(torch.einsum("bchw,cd->bdhw", z, weight)) * torch.cos(t.double() / 300).reshape(
            -1, 1, 1, 1
        )
        return eps + 0.1 * wobble

    return model


class NoiseQueue:
    """A noise source replaying a fixed list, recording how often it is called."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws, self.calls = list(draws), 0

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        self.calls += 1
        return self.draws.pop(0)


def _setup(scheduler_cls, steps: int, **config):
    scheduler = scheduler_cls.from_config({**SD15, **config})  # as pipelines do; drops unknown keys
    scheduler.set_timesteps(steps)
    _to_float64(scheduler)
    abar = _abar(scheduler)
    model = eps_network(abar)
    denoise = DiscreteDenoiser(model, abar, "epsilon")
    z_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return scheduler, abar, model, denoise, z_init


def _sigmas_at(abar: torch.Tensor, timesteps, final: float) -> torch.Tensor:
    ms = schedules.model_sigmas(abar)
    return torch.cat([ms[torch.as_tensor(timesteps).long()], torch.tensor([final], dtype=torch.float64)])


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(eta: float) -> None:
    scheduler, abar, model, denoise, z = _setup(DDIMScheduler, 20)
    draws = [torch.randn(SHAPE, dtype=torch.float64) for _ in scheduler.timesteps]
    theirs = z.clone()
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(model(theirs, t), t, theirs, eta=eta, variance_noise=draws[i]).prev_sample
    # set_alpha_to_one=False: the last step lands on alphas_cumprod[0], not on sigma 0.
    final = float(schedules.model_sigmas(abar)[0])
    sigmas = _sigmas_at(abar, scheduler.timesteps, final)
    assert torch.allclose(sigmas[:-1], schedules.ddim(20, schedules.model_sigmas(abar))[:-1])
    noise = NoiseQueue(draws)
    ours = sample_ddim(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas, eta=eta, noise=noise)
    assert _max_diff(ours / math.sqrt(1 + final**2), theirs) < TOL
    assert noise.calls == (len(draws) if eta else 0)


def test_ddim_set_alpha_to_one_is_a_trailing_zero() -> None:
    scheduler, abar, model, denoise, z = _setup(DDIMScheduler, 10, set_alpha_to_one=True)
    theirs = z.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, t), t, theirs).prev_sample
    sigmas = schedules.ddim(10, schedules.model_sigmas(abar))
    ours = sample_ddim(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas)
    assert _max_diff(ours, theirs) < TOL


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_diffusers(variance: str) -> None:
    kind = {"small": "fixed_small", "large": "fixed_large"}[variance]
    scheduler, abar, model, denoise, z = _setup(DDPMScheduler, 50, variance_type=kind)
    steps = len(scheduler.timesteps)
    if variance == "large":
        steps -= (
            1  # diffusers' fixed_large adds noise even on the step to t = -1 (abar = 1); we stop before it
        )
    theirs, gen = z.clone(), torch.Generator().manual_seed(3)
    for t in scheduler.timesteps[:steps]:
        theirs = scheduler.step(model(theirs, t), t, theirs, generator=gen).prev_sample
    sigmas = _sigmas_at(abar, scheduler.timesteps, 0.0)[: steps + 1]
    ours_gen = torch.Generator().manual_seed(3)

    def noise(sigma, sigma_next):
        return torch.randn(SHAPE, generator=ours_gen, dtype=torch.float64)

    ours = sample_ddpm(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas, noise=noise, variance=variance)
    ours = ours / math.sqrt(1 + sigmas[-1] ** 2)
    # diffusers' fixed_small clamps the last (zero) variance to 1e-20 and adds 1e-10 * noise there.
    assert _max_diff(ours, theirs) < (1e-9 if variance == "small" else TOL)


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_plms_matches_diffusers_pndm_skip_prk(steps: int) -> None:
    scheduler, abar, model, denoise, z = _setup(PNDMScheduler, steps, skip_prk_steps=True)
    theirs = z.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, t), t, theirs).prev_sample
    final = float(schedules.model_sigmas(abar)[0])
    sigmas = _sigmas_at(abar, scheduler._timesteps[::-1].copy(), final)
    calls = []

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return denoise(x, sigma)

    ours = sample_plms(counting, z * math.sqrt(1 + sigmas[0] ** 2), sigmas)
    if steps == 1:  # diffusers skips the improved-Euler start when there is no second timestep; we do not
        assert len(calls) == 2
        return
    assert len(calls) == len(scheduler.timesteps)
    assert _max_diff(ours / math.sqrt(1 + final**2), theirs) < TOL


# diffusers' bh1 returns NaN on a step to sigma 0 (B(h) = -inf times a zero sum), so bh1 ends at sigma_min,
# which is also where A1111's UniPC ends (alphas_cumprod[0]).
@pytest.mark.parametrize(
    ("order", "variant", "spacing", "karras", "final"),
    [
        (2, "bh2", "linspace", False, "zero"),
        (3, "bh2", "linspace", False, "zero"),
        (2, "bh2", "leading", False, "sigma_min"),
        (2, "bh1", "linspace", False, "sigma_min"),
        (3, "bh1", "leading", False, "sigma_min"),
        (2, "bh2", "linspace", True, "zero"),
        (3, "bh2", "linspace", True, "zero"),
    ],
)
def test_unipc_matches_diffusers(order: int, variant: str, spacing: str, karras: bool, final: str) -> None:
    scheduler, abar, model, denoise, z = _setup(
        UniPCMultistepScheduler,
        12,
        solver_order=order,
        solver_type=variant,
        timestep_spacing=spacing,
        use_karras_sigmas=karras,
        final_sigmas_type=final,
    )
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    theirs = z.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, t), t, theirs).prev_sample
    sigmas = scheduler.sigmas.clone()
    if karras:
        # diffusers runs the model at the rounded timestep of each Karras sigma; so does eps_network.
        ts = schedules.sigma_to_t(sigmas[:-1], schedules.model_sigmas(abar)).round()
        assert torch.equal(ts.long(), scheduler.timesteps)
    ours = sample_unipc(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas, order=order, variant=variant)
    assert _max_diff(ours / math.sqrt(1 + sigmas[-1] ** 2), theirs) < TOL


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(steps: int) -> None:
    scheduler, abar, model, denoise, z = _setup(LCMScheduler, steps, timestep_spacing="leading")
    gen = torch.Generator().manual_seed(5)
    theirs = z.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, t), t, theirs, generator=gen).prev_sample
    ms = schedules.model_sigmas(abar)
    sigmas = lcm_schedule(steps, ms)
    assert torch.equal(sigmas[:-1], _sigmas_at(abar, scheduler.timesteps, 0.0)[:-1])
    ours_gen = torch.Generator().manual_seed(5)

    def noise(sigma, sigma_next):
        return torch.randn(SHAPE, generator=ours_gen, dtype=torch.float64)

    ours = sample_lcm(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas, noise=noise, model_sigmas=ms)
    # diffusers computes c_skip/c_out from the int64 timestep in float32 (c_out(259) = 1 - 1.9e-8 -> 1).
    assert _max_diff(ours, theirs) < 1e-7


def test_lcm_schedule_matches_diffusers_for_every_step_count() -> None:
    scheduler = LCMScheduler.from_config(SD15)
    ms = schedules.model_sigmas(_abar(scheduler))
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        picks = schedules.sigma_to_t(lcm_schedule(steps, ms)[:-1], ms).round().long()
        assert torch.equal(picks, scheduler.timesteps), steps


# A1111 >= 1.6 (modules/sd_samplers_timesteps_impl.py), transcribed in VP form as the oracle for its
# timestep handling: timesteps = range(0, 1000, 1000 // n) + 1, len - 1 steps, the last landing on t = 1.


def a1111_timesteps(n: int) -> torch.Tensor:
    return torch.clip(torch.arange(0, 1000, 1000 // n) + 1, 0, 999)


def a1111_ddim(model, z, timesteps, abar, eta, draws):
    alphas, alphas_prev = abar[timesteps], abar[torch.nn.functional.pad(timesteps[:-1], (1, 0))]
    sig = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(z, timesteps[index])
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (z - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        z = a_prev.sqrt() * pred_x0 + (1 - a_prev - sig[index] ** 2).sqrt() * e_t + sig[index] * draws[i]
    return z


def a1111_plms(model, z, timesteps, abar):
    alphas, alphas_prev = abar[timesteps], abar[torch.nn.functional.pad(timesteps[:-1], (1, 0))]
    old_eps: list[torch.Tensor] = []

    def transfer(z, e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        return a_prev.sqrt() * (z - (1 - a_t).sqrt() * e_t) / a_t.sqrt() + (1 - a_prev).sqrt() * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(z, timesteps[index])
        if not old_eps:
            e_t_next = model(transfer(z, e_t, index), timesteps[max(index - 1, 0)])
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        z = transfer(z, e_prime, index)
        old_eps = [*old_eps[-2:], e_t]
    return z


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a1111_ddim_is_ddim_schedule_without_trailing_zero(eta: float) -> None:
    scheduler, abar, model, denoise, z = _setup(DDIMScheduler, 20)
    draws = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(20)]
    theirs = a1111_ddim(model, z, a1111_timesteps(20), abar, eta, draws)
    sigmas = schedules.ddim(20, schedules.model_sigmas(abar))[:-1]  # 19 steps ending at sigma(t = 1)
    ours = sample_ddim(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas, eta=eta, noise=NoiseQueue(draws))
    assert _max_diff(ours / math.sqrt(1 + sigmas[-1] ** 2), theirs) < TOL


def test_a1111_plms_is_ddim_schedule_without_trailing_zero() -> None:
    scheduler, abar, model, denoise, z = _setup(DDIMScheduler, 20)
    theirs = a1111_plms(model, z, a1111_timesteps(20), abar)
    sigmas = schedules.ddim(20, schedules.model_sigmas(abar))[:-1]
    ours = sample_plms(denoise, z * math.sqrt(1 + sigmas[0] ** 2), sigmas)
    assert _max_diff(ours / math.sqrt(1 + sigmas[-1] ** 2), theirs) < TOL
