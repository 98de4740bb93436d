"""Turn a network trained on a discrete DDPM schedule into a denoiser ``denoise(x, sigma, cond) -> x0``.

Notation (Karras et al. 2022, Table 1, "VP" column; k-diffusion external.py):
    x       = x0 + sigma * eps, the variance-exploding sample the samplers carry
    c_in    = 1 / sqrt(sigma^2 + 1), so x * c_in is the network's variance-preserving input x_t
    t       = the continuous training timestep of sigma (log-sigma interpolation, see schedules.sigma_to_t)
    eps:    x0 = x - sigma * F                                  (k-diffusion DiscreteEpsDDPMDenoiser)
    v:      x0 = c_skip * x + c_out * F, c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
            (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1 - abar) x0; DiscreteVDDPMDenoiser)
    x0:     x0 = F
where F = model(x * c_in, t, cond). This is the only place that knows about prediction types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from latentforge.sampling import schedules

__all__ = ["PREDICTION_TYPES", "DiscreteDenoiser", "Prediction"]

Prediction = Literal["epsilon", "v", "x0"]
PREDICTION_TYPES = ("epsilon", "v", "x0")


class DiscreteDenoiser:
    """Wraps ``model(x_in, t, cond) -> eps | v | x0`` as ``denoise(x, sigma, cond) -> x0``."""

    def __init__(
        self,
        model: Callable[[Tensor, Tensor, Any], Tensor],
        alphas_cumprod: Tensor,
        prediction: Prediction = "epsilon",
    ) -> None:
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")
        self.model = model
        self.prediction = prediction
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sigmas = schedules.model_sigmas(self.alphas_cumprod)  # ascending, float64

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Continuous timestep of sigma (float64)."""
        return schedules.sigma_to_t(sigma, self.sigmas)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma at continuous timestep t (float64)."""
        return schedules.t_to_sigma(t, self.sigmas)

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        """Predicted x0 for x = x0 + sigma * eps; sigma is a scalar or one value per batch row."""
        # Sigma math in float64 on the CPU (MPS has no float64), the network in its own dtype.
        sigma64 = torch.as_tensor(sigma).detach().to("cpu", torch.float64).reshape(-1)
        sigma64 = sigma64.expand(x.shape[0]) if sigma64.numel() == 1 else sigma64
        t = self.sigma_to_t(sigma64).to(x.device, torch.promote_types(x.dtype, torch.float32))
        view = (-1,) + (1,) * (x.ndim - 1)

        def per_row(c: Tensor) -> Tensor:
            return c.to(x.device, x.dtype).view(view)

        c_in = per_row(1 / (sigma64**2 + 1).sqrt())
        out = self.model(x * c_in, t, cond)
        if self.prediction == "epsilon":
            return x - per_row(sigma64) * out
        if self.prediction == "v":
            return per_row(1 / (sigma64**2 + 1)) * x + per_row(-sigma64 / (sigma64**2 + 1).sqrt()) * out
        return out
