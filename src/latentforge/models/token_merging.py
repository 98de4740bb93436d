"""Apply ToMe (models/attention.py `TokenMerging`) to a U-Net for a while, with exact undo.

Every BasicTransformerBlock gets the one `MergePlanner` of the U-Net, and a forward pre-hook records the
latent size each forward starts from (the blocks derive their grid and downsampling from it, as tomesd).
Undo removes both; nothing else of the module changes, so ratio 0 and an undone patch are the plain model
bit for bit.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from latentforge.models.attention import MergePlanner, TokenMerging
from latentforge.models.unet import BasicTransformerBlock


class TokenMergingHandle:
    """Undo of `apply_token_merging` (also a context manager)."""

    def __init__(self, unet: nn.Module, planner: MergePlanner) -> None:
        self.blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
        if any(block.token_merging is not None for block in self.blocks):
            raise RuntimeError("ToMe is already applied to this U-Net: undo that first")
        for block in self.blocks:
            block.token_merging = planner

        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            planner.size = (args[0].shape[2], args[0].shape[3])

        self.hook = unet.register_forward_pre_hook(record)

    def undo(self) -> None:
        self.hook.remove()
        for block in self.blocks:
            block.token_merging = None
        self.blocks = []

    def __enter__(self) -> TokenMergingHandle:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.undo()


def apply_token_merging(
    unet: nn.Module, settings: TokenMerging, generator: torch.Generator | None = None
) -> TokenMergingHandle:
    """Merge tokens in `unet`'s self-attention until `undo()`; `generator` draws the random dst (use_rand)."""
    if not 0 <= settings.ratio < 1:
        raise ValueError(f"ToMe ratio must be in [0, 1), got {settings.ratio}")
    if settings.use_rand and generator is None:
        raise ValueError("ToMe use_rand needs a seeded generator")
    return TokenMergingHandle(unet, MergePlanner(settings, generator=generator))
