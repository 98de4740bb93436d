"""Analytic Gaussian test model: data x0 ~ N(mu, s^2 I), so the ideal denoiser and ODE are closed-form.

With x = x0 + sigma * eps (k-diffusion's VE convention):
    D(x, sigma)      = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) * (x - mu)
    marginal         x ~ N(mu, (s^2 + sigma^2) I)
    probability-flow ODE dx/dsigma = (x - D) / sigma = sigma / (s^2 + sigma^2) * (x - mu), solved by
    x(sigma_b) = mu + (x(sigma_a) - mu) * sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2))

Usage::

    from analytic import AnalyticGaussian
    g = AnalyticGaussian(mu=0.5, s=0.7)
    x0 = g(x, sigma)                              # denoiser, sigma scalar or [B]
    exact = g.ode_solution(x, sigma_from, sigma_to)
    net = g.network("v", alphas_cumprod)          # model(x_in, t, cond) for DiscreteDenoiser tests
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from latentforge.sampling import schedules


def _per_row(sigma: Tensor | float, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


@dataclass(frozen=True)
class AnalyticGaussian:
    """Exact denoiser of N(mu, s^2 I) data; a tensor ``cond`` (broadcastable, per row) overrides mu."""

    mu: float = 0.0
    s: float = 1.0

    def _mu(self, cond: Any, x: Tensor) -> Tensor | float:
        if isinstance(cond, dict):
            cond = cond.get("crossattn")
        if cond is None:
            return self.mu
        cond = torch.as_tensor(cond, dtype=x.dtype, device=x.device)
        return cond.reshape(cond.shape[0], *([1] * (x.ndim - 1))) if cond.ndim == 1 else cond

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        """E[x0 | x0 + sigma * eps = x]."""
        mu, sig = self._mu(cond, x), _per_row(sigma, x)
        return mu + self.s**2 / (self.s**2 + sig**2) * (x - mu)

    def ode_solution(self, x: Tensor, sigma_from: float, sigma_to: float, cond: Any = None) -> Tensor:
        """Exact probability-flow ODE transport of x from sigma_from to sigma_to."""
        mu = self._mu(cond, x)
        ratio = ((self.s**2 + sigma_to**2) / (self.s**2 + sigma_from**2)) ** 0.5
        return mu + (x - mu) * ratio

    def marginal_std(self, sigma: float) -> float:
        """Standard deviation of x at noise level sigma."""
        return (self.s**2 + sigma**2) ** 0.5

    def prior_sample(self, noise: Tensor, sigma: float) -> Tensor:
        """An exact sample of the marginal at sigma, N(mu, s^2 + sigma^2), from unit noise."""
        return self.mu + self.marginal_std(sigma) * noise

    def network(self, prediction: str, alphas_cumprod: Tensor):
        """A network ``model(x_in, t, cond)`` predicting eps, v or x0 in the VP parametrisation.

        It inverts DiscreteDenoiser's input scaling: sigma = t_to_sigma(t), x = x_in * sqrt(sigma^2 + 1).
        """
        sigmas = schedules.model_sigmas(alphas_cumprod)

        def model(x_in: Tensor, t: Tensor, cond: Any = None) -> Tensor:
            sigma = _per_row(schedules.t_to_sigma(t.to(torch.float64), sigmas).to(x_in.dtype), x_in)
            x = x_in * (sigma**2 + 1) ** 0.5
            x0 = self(x, sigma.reshape(-1), cond)
            eps = (x - x0) / sigma
            if prediction == "epsilon":
                return eps
            if prediction == "v":
                # v = sqrt(abar) eps - sqrt(1 - abar) x0 with sqrt(abar) = 1 / sqrt(1 + sigma^2).
                return (eps - sigma * x0) / (sigma**2 + 1) ** 0.5
            return x0

        return model
