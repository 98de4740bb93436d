"""The contract between the generic training loop and what is trained (CLIP, VAE, U-Net, LoRA ...).

The loop (`training/loop.py`) owns everything a run has in common: config, run directory, optimizer,
LR schedule, EMA, autocast, gradient accumulation and clipping, DDP, logging, sample grids, exact
resume. A task owns the model-specific parts and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset


class TrainingTask(Protocol):
    """What one kind of training provides to the loop."""

    name: str  # "clip", "vae", "unet" ...

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates (and that EMA tracks and DDP wraps)."""
        ...

    def dataset(self, split: str) -> Dataset:
        """Items for `split` ("train" or "holdout"); the loop shards, shuffles and batches them."""
        ...

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for one micro-batch and metrics to log; all randomness from `generator`.

        `model` is `trainable()` as the loop wraps it (DDP), so the forward must go through it.
        """
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics (retrieval accuracy, PSNR, loss ...), run on rank 0 every eval interval."""
        ...

    def samples(self, model: nn.Module) -> Image.Image | None:
        """A grid of fixed prompts/seeds or reconstructions to look at, or None."""
        ...

    def export(self, model: nn.Module, path: Path) -> None:
        """Write the final artefact (e.g. an original-layout `.safetensors`) from the given weights."""
        ...
