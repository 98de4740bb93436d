"""`SAMPLERS`: A1111's sampler names -> the sampler function and how A1111 drives it.

"Automatic" as a schedule means the sampler's own default, as in A1111's `samplers_k_diffusion`
table (modules/sd_samplers_kdiffusion.py): Karras for DPM++ 2M/SDE/2S a, DPM2 and Restart,
Exponential for the 2M/3M SDE samplers, the model's uniform discretisation for Euler, Heun, LMS,
and the CompVis timestep spacing ("DDIM") for the timestep samplers DDIM, PLMS and UniPC.
DPM2, DPM2 a and DPM++ 3M SDE run one step more and drop the next-to-last sigma, as A1111 does.
The timestep samplers start from unit-variance noise in the variance-preserving space, i.e.
x = noise * sqrt(1 + sigma_max^2) here (A1111's sd_samplers_timesteps and diffusers' DDIM do);
the k-samplers start from noise * sigma_max (k-diffusion, A1111).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from latentforge.sampling import ddim, k_samplers, lcm, plms, schedules, unipc

NoiseKind = Literal["none", "gaussian", "brownian"]


@dataclass(frozen=True)
class Sampler:
    function: Callable[..., torch.Tensor]
    schedule: str = "Uniform"  # what "Automatic" resolves to
    noise: NoiseKind = "none"
    discard_penultimate_sigma: bool = False
    vp_start: bool = False  # start from noise * sqrt(1 + sigma^2) instead of noise * sigma

    def initial_latent(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return noise * (sigma**2 + 1).sqrt() if self.vp_start else noise * sigma


SAMPLERS: dict[str, Sampler] = {
    "DPM++ 2M": Sampler(k_samplers.sample_dpmpp_2m, "Karras"),
    "DPM++ SDE": Sampler(k_samplers.sample_dpmpp_sde, "Karras", "brownian"),
    "DPM++ 2M SDE": Sampler(k_samplers.sample_dpmpp_2m_sde, "Exponential", "brownian"),
    "DPM++ 2M SDE Heun": Sampler(
        partial(k_samplers.sample_dpmpp_2m_sde, solver_type="heun"), "Exponential", "brownian"
    ),
    "DPM++ 2S a": Sampler(k_samplers.sample_dpmpp_2s_ancestral, "Karras", "gaussian"),
    "DPM++ 3M SDE": Sampler(k_samplers.sample_dpmpp_3m_sde, "Exponential", "brownian", True),
    "Euler a": Sampler(k_samplers.sample_euler_ancestral, noise="gaussian"),
    "Euler": Sampler(k_samplers.sample_euler),
    "LMS": Sampler(k_samplers.sample_lms),
    "Heun": Sampler(k_samplers.sample_heun),
    "DPM2": Sampler(k_samplers.sample_dpm_2, "Karras", discard_penultimate_sigma=True),
    "DPM2 a": Sampler(k_samplers.sample_dpm_2_ancestral, "Karras", "gaussian", True),
    "Restart": Sampler(k_samplers.sample_restart, "Karras", "gaussian"),
    "DDIM": Sampler(ddim.sample_ddim, "DDIM", "gaussian", vp_start=True),
    "DDPM": Sampler(ddim.sample_ddpm, noise="gaussian", vp_start=True),
    "PLMS": Sampler(plms.sample_plms, "DDIM", vp_start=True),
    "UniPC": Sampler(unipc.sample_unipc, "DDIM", vp_start=True),
    "LCM": Sampler(lcm.sample_lcm, noise="gaussian"),
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}") from None


def resolve_schedule(sampler: str, schedule: str = "Automatic") -> str:
    """The schedule name to use; "Automatic" becomes the sampler's default. Errors list valid names."""
    name = get_sampler(sampler).schedule if schedule == "Automatic" else schedule
    schedules.get_schedule(name)
    return name


def sampling_sigmas(sampler: str, schedule: str, steps: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The descending sigmas (trailing 0) a sampler runs `steps` steps over."""
    spec = get_sampler(sampler)
    fn = schedules.get_schedule(resolve_schedule(sampler, schedule))
    if spec.discard_penultimate_sigma:
        sigmas = fn(steps + 1, model_sigmas)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return fn(steps, model_sigmas)
