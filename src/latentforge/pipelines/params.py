"""Generation parameters: one dataclass for the CLI, the Python API and the HTTP server.

Field names follow A1111's API payload (`steps`, `cfg_scale`, `denoising_strength`, ...) so that
a request from an A1111 client maps onto it with little translation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from latentforge.errors import ParameterError
from latentforge.models.families import ModelFamily

MAX_STEPS = 1000
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_TILED_VAE_PIXELS = 1536 * 1536


@dataclass(frozen=True)
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    cfg_scale: float = 7.0
    cfg_rescale: float = 0.0
    seed: int = -1  # -1: a random seed, reported in the result
    subseed: int = -1
    subseed_strength: float = 0.0  # A1111's variation seed
    width: int = 0  # 0: the family's default size
    height: int = 0
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 0  # 0: the family's default (1 for SD 1.x, 2 for SD 2.x)
    eta: float | None = None  # ancestral/SDE noise multiplier, sampler default when None
    denoising_strength: float = 0.75  # img2img and the hires pass
    tiled_vae: bool | None = None  # VAE in overlapping tiles; None: above `tiled_vae_pixels` only
    tiled_vae_pixels: int = DEFAULT_TILED_VAE_PIXELS
    extra: dict[str, Any] = field(default_factory=dict)  # free-form infotext additions

    def resolved(self, family: ModelFamily) -> GenerationParams:
        """Defaults filled in from the family."""
        return replace(
            self,
            width=self.width or family.default_size,
            height=self.height or family.default_size,
            clip_skip=self.clip_skip or family.default_clip_skip,
        )

    def use_tiled_vae(self, width: int, height: int) -> bool:
        """Whether the VAE runs tiled for an image of this size."""
        return self.tiled_vae if self.tiled_vae is not None else width * height > self.tiled_vae_pixels

    def validate(self, family: ModelFamily, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        """Raise ParameterError for anything that cannot be generated; names the valid range."""
        from latentforge.sampling.registry import SAMPLERS, resolve_schedule

        if self.sampler not in SAMPLERS:
            raise ParameterError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        resolve_schedule(self.sampler, self.schedule)  # raises with the valid names
        if not 1 <= self.steps <= MAX_STEPS:
            raise ParameterError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not (math.isfinite(self.cfg_scale) and math.isfinite(self.cfg_rescale)):
            values = f"{self.cfg_scale}, {self.cfg_rescale}"
            raise ParameterError(f"CFG scale and rescale must be finite numbers, got {values}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise ParameterError(f"denoising strength must be in [0, 1], got {self.denoising_strength}")
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise ParameterError(f"variation strength must be in [0, 1], got {self.subseed_strength}")
        if self.batch_size < 1 or self.batch_count < 1:
            raise ParameterError("batch size and batch count must be at least 1")
        if self.clip_skip < 0 or self.clip_skip > family.text_encoder.layers:
            raise ParameterError(f"clip skip must be between 1 and {family.text_encoder.layers}")
        if self.eta is not None and not (math.isfinite(self.eta) and self.eta >= 0):
            raise ParameterError(f"eta must be a finite number >= 0, got {self.eta}")
        check_size(family, self.width or family.default_size, self.height or family.default_size, max_pixels)


def check_size(family: ModelFamily, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Sizes are never changed silently: one the VAE cannot take is an error naming the nearest valid one."""
    multiple = latent_multiple(family)
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise ParameterError(
                f"{name} {value} is not a positive multiple of {multiple} (the VAE's factor for this "
                f"model); nearest valid: {nearest_valid(value, multiple)}"
            )
    if width * height > max_pixels:
        raise ParameterError(f"{width}x{height} exceeds the limit of {max_pixels} pixels")


def nearest_valid(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def latent_multiple(family: ModelFamily) -> int:
    """Image sizes must be multiples of the VAE factor; the U-Net takes any latent size."""
    return family.vae.downsampling_factor


def params_from_dict(data: dict[str, Any]) -> GenerationParams:
    """Build params from a mapping, rejecting unknown names with the list of known ones."""
    known = {f.name for f in fields(GenerationParams)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ParameterError(f"unknown parameters {unknown}; known: {', '.join(sorted(known))}")
    return GenerationParams(**data)
