"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022), with CFG rescale (Lin et al. 2023).

Notation: D_c = denoise(x, sigma, cond), D_u = denoise(x, sigma, uncond), w = guidance scale, phi = rescale.
    D_cfg      = D_u + w (D_c - D_u)
    rescaled   = D_cfg * std(D_c) / std(D_cfg)                  (Lin et al. 2023, Algorithm 2, eqs. 15-16)
    result     = phi * rescaled + (1 - phi) * D_cfg
Guidance on x0 equals guidance on eps (eps = (x - x0) / sigma is affine in x0 with weights summing to 1), as
in A1111's CFGDenoiser. The rescale is computed on x0 here (std over each image); the paper computes it on
the v prediction and diffusers' ``rescale_noise_cfg`` on the raw network output (eps or v), so phi > 0 gives
close but not identical results to those.

CFG truncation (`CFGTruncation`) skips the unconditional half of the batch on some evaluations; such an
evaluation returns D_c (guidance scale 1), halving its cost. Two rules, either may fire:
    NGMS      sigma < min_sigma on every other evaluation (or all, `every_call`): A1111's "negative guidance
              minimum sigma" (s_min_uncond, modules/sd_samplers_cfg_denoiser.py, PR 9177)
    cutoff    step index > int(steps * cutoff): diffusers' SDCFGCutoffCallback (cutoff_step_ratio)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["CFGDenoiser", "CFGTruncation", "cfg_denoiser", "concat_cond"]

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]  # the model seam: x0 = denoise(x, sigma, cond)


def _cat_pair(a: Tensor, b: Tensor, key: str) -> Tensor:
    if b.shape[0] == 1 and a.shape[0] > 1:  # one negative prompt for the whole batch
        b = b.expand(a.shape[0], *b.shape[1:])
    if a.shape[1:] != b.shape[1:] or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"cond and uncond {key} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; pad both prompts "
            "to the same number of tokens and give uncond batch 1 or the cond batch size"
        )
    return torch.cat([a, b])


def concat_cond(cond: Any, uncond: Any) -> Any:
    """Stack cond then uncond along the batch: tensors, or dicts of tensors with the same keys, or None."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, dict) and isinstance(uncond, dict):
        if cond.keys() != uncond.keys():
            raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
        return {k: _cat_pair(cond[k], uncond[k], repr(k)) for k in cond}
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return _cat_pair(cond, uncond, "tensor")
    raise TypeError(
        f"cannot batch cond of type {type(cond).__name__} with uncond of type {type(uncond).__name__}"
    )


@dataclass(frozen=True)
class CFGTruncation:
    """Which guided evaluations skip the unconditional pass; the defaults never skip (the exact path)."""

    min_sigma: float = 0.0  # A1111's NGMS: 0 = off
    every_call: bool = (
        False  # A1111's "NGMS all steps": below min_sigma skip every evaluation, not every other
    )
    cutoff: float = 1.0  # fraction of the steps that are guided; 1 = all

    def skips(self, sigma: float, call: int, step: int, steps: int) -> bool:
        """Whether evaluation number `call` (from 0), at `sigma` in step `step` of `steps`, runs cond only."""
        # A1111 counts denoiser calls (self.step), so Heun's second evaluation counts too; odd calls skip.
        if 0 < sigma < self.min_sigma and (self.every_call or call % 2 == 1):
            return True
        return self.cutoff < 1 and step > int(steps * self.cutoff)

    @property
    def active(self) -> bool:
        return self.min_sigma > 0 or self.cutoff < 1

    def counter(self, steps: int) -> Callable[[Tensor | float, int], bool]:
        """`skip(sigma, step)` for one sampling run of `steps` steps, counting its calls as A1111's
        CFGDenoiser counts `self.step` (so a conditioner need not keep the count itself)."""
        calls = [0]

        def skip(sigma: Tensor | float, step: int) -> bool:
            call, calls[0] = calls[0], calls[0] + 1
            return self.skips(float(torch.as_tensor(sigma).reshape(-1)[0]), call, step, steps)

        return skip


def _per_image(value: float | Tensor, like: Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value


class CFGDenoiser:
    """``denoise(x, sigma, cond)`` with classifier-free guidance against a fixed ``uncond``.

    ``scale`` and ``rescale`` are floats or per-image tensors ``[B]``. One forward pass of batch 2B runs
    cond and uncond together; when every scale is 1 only the cond pass runs.
    """

    def __init__(self, denoise: Denoiser, uncond: Any, scale: float | Tensor, rescale: float | Tensor = 0.0):
        for name, value in (("scale", scale), ("rescale", rescale)):
            if not bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all()):
                raise ValueError(f"guidance {name} must be finite, got {value}")
        self.denoise, self.uncond, self.scale, self.rescale = denoise, uncond, scale, rescale

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        scale = torch.as_tensor(self.scale, dtype=torch.float64)
        if bool((scale == 1).all()):
            return self.denoise(x, torch.as_tensor(sigma), cond)  # a no-op for tensor sigmas
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), concat_cond(cond, self.uncond))
        d_cond, d_uncond = both[: x.shape[0]], both[x.shape[0] :]
        d_cfg = d_uncond + _per_image(self.scale, x) * (d_cond - d_uncond)
        if not isinstance(self.rescale, Tensor) and self.rescale == 0:
            return d_cfg
        dims = tuple(range(1, x.ndim))
        rescaled = d_cfg * (d_cond.std(dim=dims, keepdim=True) / d_cfg.std(dim=dims, keepdim=True))
        phi = _per_image(self.rescale, x)
        return phi * rescaled + (1 - phi) * d_cfg


def cfg_denoiser(
    denoise: Denoiser, uncond: Any, scale: float | Tensor, rescale: float | Tensor = 0.0
) -> CFGDenoiser:
    """Wrap ``denoise`` with classifier-free guidance; see ``CFGDenoiser``."""
    return CFGDenoiser(denoise, uncond, scale, rescale)
