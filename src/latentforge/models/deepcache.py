"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse the U-Net's deep
features across adjacent evaluations and run only its shallow branch in between.

Notation: the U-Net has input blocks D_0..D_{L-1} (D_0 is the input conv), the middle block M and output
blocks U_0..U_{L-1}, where U_{L-1-i} consumes the skip of D_i. Branch b (the package's `cache_branch_id`)
is the shallow branch D_0..D_b, U_{L-1-b}..U_{L-1}. A full evaluation runs every block and keeps h_b, the
feature entering U_{L-1-b} (the output of U_{L-2-b}, or of M plus its ControlNet residual for b = L-1); a
cached evaluation runs only the shallow branch and starts the up path from the kept h_b. With the
uniform schedule (the paper's, the package's `skip_mode="uniform"`), evaluation n of a sampling pass
(counted from 0) is full when n % N == 0, N the cache interval. For SD's layout (two ResBlocks and a
Downsample per level) b = 3 * block + layer, the package's `cache_block_id`/`cache_layer_id` split.

An "evaluation" is one U-Net call: one per step for the one-call samplers (there it equals the package,
which counts the scheduler's timesteps), two per step for Heun, DPM2 and DPM++ 2S/SDE, so every sampler
spends the same fraction ceil(n / N) / n of full evaluations, and a cached evaluation is never further
than N - 1 calls from the evaluation its features came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentforge.models.configs import UNetConfig


def input_block_count(config: UNetConfig) -> int:
    """L, the number of input blocks (= output blocks) of a U-Net: branches are 0..L-1."""
    levels = len(config.channel_mult)
    return 1 + levels * config.num_res_blocks + levels - 1


@dataclass
class DeepCache:
    """The feature cache of one sampling pass (build a new one per pass: img2img, the hires pass ...).

    `UNetModel.forward(..., deep_cache=)` asks `reuses(x)` whether an evaluation is a cached one, takes
    `feature` then and hands h_b to `keep` on every evaluation.
    """

    interval: int
    branch: int = 0
    calls: int = 0
    _kept: torch.Tensor | None = field(default=None, repr=False)
    _kept_input: torch.Size | None = field(default=None, repr=False)  # the x it was computed from
    _full: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        if self.interval < 1 or self.branch < 0:
            raise ValueError(
                f"DeepCache needs interval >= 1 and branch >= 0, got {self.interval}, {self.branch}"
            )

    def reuses(self, x: torch.Tensor, blocks: int) -> bool:
        """Whether this evaluation of `x` (by a U-Net of `blocks` input blocks) is a cached one."""
        if self.branch >= blocks:
            raise ValueError(f"DeepCache branch {self.branch} needs more than {blocks} input blocks")
        call, self.calls = self.calls, self.calls + 1
        self._full = call % self.interval == 0 or not self._fits(x)
        if self._full:
            self._kept_input = x.shape
        return not self._full

    def _fits(self, x: torch.Tensor) -> bool:
        # The kept batch may be a CFG batch (cond rows, then uncond rows: sampling/guidance.py) and this
        # evaluation its cond rows only (NGMS, CFG cut-off): the leading rows are the same images. Any
        # other change (a batch that grew, another size) runs a full evaluation instead.
        kept = self._kept_input
        return kept is not None and kept[0] in (x.shape[0], 2 * x.shape[0]) and kept[1:] == x.shape[1:]

    def feature(self, batch: int) -> torch.Tensor:
        """h_b of the last full evaluation, for a cached evaluation of `batch` images."""
        assert self._kept is not None and not self._full
        return self._kept[:batch]

    def keep(self, h: torch.Tensor) -> None:
        """Called with h_b by every evaluation; kept from a full one."""
        if self._full:
            self._kept = h
