"""`SAMPLERS`: A1111's sampler names -> the sampler function and how A1111 drives it.

"Automatic" as a schedule means the sampler's own default, as in A1111's `samplers_k_diffusion`
table (modules/sd_samplers_kdiffusion.py): Karras for DPM++ 2M/SDE/2S a, DPM2 and Restart,
Exponential for the 2M/3M SDE samplers, the model's uniform discretisation for Euler, Heun, LMS,
and the CompVis timestep spacing ("DDIM") for the timestep samplers DDIM, PLMS and UniPC.
DPM2, DPM2 a and DPM++ 3M SDE run one step more and drop the next-to-last sigma, as A1111 does.
A sampler's options are the scalar keyword arguments of its function (eta, s_noise, order ...), read
from the signature, so the function is the one declaration; `needs` lists what the model supplies.
The timestep samplers start from unit-variance noise in the variance-preserving space, i.e.
x = noise * sqrt(1 + sigma_max^2) here (A1111's sd_samplers_timesteps and diffusers' DDIM do);
the k-samplers start from noise * sigma_max (k-diffusion, A1111).
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from latentforge.errors import ParameterError
from latentforge.sampling import ddim, k_samplers, lcm, plms, schedules, unipc

NoiseKind = Literal["none", "gaussian", "brownian"]
OptionValue = float | int | bool | str
# The arguments every sampler takes; whatever else its signature has is an option of that sampler.
_SEAM = ("denoise", "x", "sigmas", "callback", "noise")
# What the runner supplies from the model rather than from the request.
MODEL_INPUTS = ("model_sigmas",)


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the function, how A1111 drives it, and the options its signature declares."""

    function: Callable[..., torch.Tensor]
    schedule: str = "Uniform"  # what "Automatic" resolves to
    noise: NoiseKind = "none"
    discard_penultimate_sigma: bool = False
    vp_start: bool = False  # start from noise * sqrt(1 + sigma^2) instead of noise * sigma
    options: Mapping[str, OptionValue] = field(init=False)  # option name -> default
    needs: tuple[str, ...] = field(init=False)  # of MODEL_INPUTS

    def __post_init__(self) -> None:
        fixed = self.function.keywords if isinstance(self.function, partial) else {}
        options, needs = {}, []
        for name, parameter in inspect.signature(self.function).parameters.items():
            if name in _SEAM or name in fixed:
                continue
            if name in MODEL_INPUTS:
                needs.append(name)
            elif isinstance(parameter.default, OptionValue):  # scalar options; tables like restart_list stay
                options[name] = parameter.default
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "needs", tuple(needs))

    def initial_latent(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return noise * (sigma**2 + 1).sqrt() if self.vp_start else noise * sigma

    def choices(self, option: str) -> tuple[str, ...]:
        """The allowed values of a string option (its Literal annotation); empty for numbers."""
        function = self.function.func if isinstance(self.function, partial) else self.function
        hint = typing.get_type_hints(function).get(option)
        return tuple(str(v) for v in typing.get_args(hint)) if typing.get_origin(hint) is Literal else ()


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
    "Euler": Sampler(k_samplers.sample_euler, noise="gaussian"),  # noise only with s_churn > 0
    "LMS": Sampler(k_samplers.sample_lms),
    "Heun": Sampler(k_samplers.sample_heun, noise="gaussian"),
    "DPM2": Sampler(k_samplers.sample_dpm_2, "Karras", "gaussian", discard_penultimate_sigma=True),
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
        raise ParameterError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}") from None


def split_sampler_name(name: str, schedule: str = "Automatic") -> tuple[str, str]:
    """(sampler, schedule) of a name, also A1111's combined names before 1.9: "DPM++ 2M Karras".

    As A1111's get_sampler_and_scheduler, a schedule named at the end of the sampler name wins over
    `schedule`; labels match case-insensitively and A1111's internal names work too ("karras",
    "sgm_uniform", "SGMUniform"). Errors list the valid sampler names.
    """
    if name in SAMPLERS:
        return name, schedule

    words = name.split(" ")
    for i in range(1, len(words)):
        base, label = " ".join(words[:i]), schedule_label(" ".join(words[i:]))
        if base in SAMPLERS and label is not None:
            return base, label
    get_sampler(name)  # raises with the valid names
    raise AssertionError  # unreachable


def schedule_label(name: str) -> str | None:
    """A schedule's A1111 label from the label or an internal name, any case ("sgm_uniform",
    "SGMUniform" -> "SGM Uniform"); None when it names none."""

    def key(text: str) -> str:
        return text.lower().replace("_", "").replace(" ", "")

    return next((label for label in schedules.SCHEDULES if key(label) == key(name)), None)


def check_options(sampler: str, options: Mapping[str, OptionValue]) -> None:
    """ParameterError for an option the sampler does not take (naming the samplers that do) or a bad value."""
    spec = get_sampler(sampler)
    for name, value in options.items():
        if name not in spec.options:
            takers = [n for n, s in SAMPLERS.items() if name in s.options]
            where = f"samplers that take it: {', '.join(takers)}" if takers else "no sampler takes it"
            raise ParameterError(f"sampler {sampler!r} takes no option {name!r}; {where}")
        default = spec.options[name]
        if isinstance(default, str):
            choices = spec.choices(name)
            if not isinstance(value, str) or (choices and value not in choices):
                raise ParameterError(f"{sampler} option {name} must be one of {choices}, got {value!r}")
        elif isinstance(value, str) or math.isnan(value) or (math.isinf(value) and name != "s_tmax"):
            raise ParameterError(f"{sampler} option {name} must be a finite number, got {value!r}")
        elif isinstance(default, bool) and not isinstance(value, bool) and value not in (0, 1):
            raise ParameterError(f"{sampler} option {name} is on/off (true/false), got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and value != int(value):
            raise ParameterError(f"{sampler} option {name} must be a whole number, got {value!r}")
        elif name in ("eta", "s_noise", "s_churn", "s_tmin", "s_tmax") and value < 0:
            raise ParameterError(f"{sampler} option {name} must be >= 0, got {value!r}")


def resolve_schedule(sampler: str, schedule: str = "Automatic") -> str:
    """The schedule name to use; "Automatic" becomes the sampler's default. Errors list valid names."""
    name = get_sampler(sampler).schedule if schedule == "Automatic" else schedule_label(schedule)
    if name is None:
        valid = ", ".join(["Automatic", *schedules.SCHEDULES])
        raise ParameterError(f"unknown schedule {schedule!r}; valid names: {valid}")
    return name


def sampling_sigmas(sampler: str, schedule: str, steps: int, model_sigmas: torch.Tensor) -> torch.Tensor:
    """The descending sigmas (trailing 0) a sampler runs `steps` steps over."""
    spec = get_sampler(sampler)
    fn = schedules.get_schedule(resolve_schedule(sampler, schedule))
    if spec.discard_penultimate_sigma:
        sigmas = fn(steps + 1, model_sigmas)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return fn(steps, model_sigmas)
