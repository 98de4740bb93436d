"""Exponential moving average of a module's weights: ema <- decay * ema + (1 - decay) * weights.

Kept as a full copy of the module (in eval mode, no grads) so that evaluation, samples and export can
use it like the model itself. Buffers (e.g. norm statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


class EMA:
    """EMA of `model`'s parameters; before step `start` it follows the weights exactly."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0) -> None:
        self.decay, self.start = decay, start
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (0-based)."""
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if step < self.start:
                ema_p.copy_(p)
            else:
                ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
