"""Seeded noise: one CPU ``torch.Generator`` per image, so an image depends only on its own seed.

Every draw is float32 on the CPU, then cast and moved: the same seed gives the same image on any device,
in any dtype and at any batch size (A1111's ImageRNG and diffusers' ``randn_tensor`` with a generator list
do the same; diffusers draws directly in the target dtype, so it agrees with us in float32).

Two noise sources for samplers, both callables ``(sigma, sigma_next) -> Tensor`` of unit variance:
    NoiseSampler           fresh N(0, I) per call, continuing each image's generator after its initial
                           noise (A1111 and diffusers' Euler a with a generator list both do this).
    BrownianNoiseSampler   (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) of a per-image Brownian
                           motion W, a virtual Brownian tree (Li et al. 2020, "Scalable gradients for SDEs",
                           sec. 4) so that queries over any intervals are consistent, as SDE samplers need.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

__all__ = ["BrownianNoiseSampler", "NoiseSampler", "generators", "initial_noise"]

_MASK64 = (1 << 64) - 1


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One seeded CPU generator per image."""
    return [torch.Generator("cpu").manual_seed(int(seed) & _MASK64) for seed in seeds]


def _given_generators(seeds: Sequence[int] | Sequence[torch.Generator]) -> list[torch.Generator] | None:
    """``seeds`` as a list if it holds generators rather than integer seeds (the first element decides)."""
    if seeds and isinstance(seeds[0], torch.Generator):
        return list(cast("Sequence[torch.Generator]", seeds))
    return None


def _draw(gens: Sequence[torch.Generator], shape: tuple[int, ...], device, dtype) -> Tensor:
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device=device, dtype=dtype)


def initial_noise(
    seeds: Sequence[int] | Sequence[torch.Generator],
    shape: tuple[int, ...],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """N(0, I) of shape ``[len(seeds), *shape]``; ``shape`` is one image's shape, e.g. ``(4, 64, 64)``.

    Image i is ``torch.randn(shape, generator=Generator("cpu").manual_seed(seeds[i]))``. Passing generators
    instead of seeds draws from (and advances) them.
    """
    gens = _given_generators(seeds)
    if gens is None:
        gens = generators(cast("Sequence[int]", seeds))
    return _draw(gens, tuple(shape), device, dtype)


class NoiseSampler:
    """Step noise for ancestral samplers: ``(sigma, sigma_next) -> N(0, I)``, one generator per image.

    Given seeds, it makes fresh generators and skips one image's worth of draws so that the step noise
    continues each generator exactly where ``initial_noise(seeds, shape)`` stopped. Given generators, it
    draws from them as they are (share them with ``initial_noise`` for the same effect).
    """

    def __init__(
        self,
        seeds: Sequence[int] | Sequence[torch.Generator],
        shape: tuple[int, ...],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        given = _given_generators(seeds)
        if given is not None:
            self.generators = given
        else:
            self.generators = generators(cast("Sequence[int]", seeds))
            _draw(self.generators, self.shape, "cpu", torch.float32)  # the initial noise

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        return _draw(self.generators, self.shape, self.device, self.dtype)


def _mix(a: int, b: int) -> int:
    """splitmix64 of (a, b): a well-spread 64-bit seed for tree node b of the image seeded with a."""
    z = (a * 0x9E3779B97F4A7C15 + b + 0x632BE59BD9B4E8E5) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class BrownianNoiseSampler:
    """Per-image seeded Brownian increments on [sigma_min, sigma_max], for SDE samplers.

    W(sigma_min) = 0 and W(sigma_max) ~ N(0, span). The interval is bisected ``depth`` times; each node's
    midpoint is drawn from the Brownian bridge between its ends with a generator seeded by (seed, node), so
    W(t) is a fixed function of (seed, t). Inside a leaf W(t) is a bridge sample seeded by (seed, leaf, t),
    so increments are exact in law between any points (leaf width span * 2**-depth; a pair inside one leaf
    is drawn jointly, which is exact for that pair but not telescoping with other queries in that leaf).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: tuple[int, ...],
        sigma_min: float,
        sigma_max: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        depth: int = 20,
    ) -> None:
        self.seeds = [int(s) & _MASK64 for s in seeds]
        self.shape, self.device, self.dtype, self.depth = tuple(shape), device, dtype, depth
        self.t0, self.t1 = float(min(sigma_min, sigma_max)), float(max(sigma_min, sigma_max))
        self._recent: dict[float, Tensor] = {}  # samplers query each sigma 2-3 times in a row

    def w(self, t: float) -> Tensor:
        """W(t) for every image, float64 on the CPU; t is clamped to [sigma_min, sigma_max]."""
        t = min(max(float(t), self.t0), self.t1)
        if t not in self._recent:
            if len(self._recent) >= 4:
                del self._recent[next(iter(self._recent))]
            self._recent[t] = self._w(t)
        return self._recent[t]

    def _normal(self, node: int) -> Tensor:
        gens = [torch.Generator("cpu").manual_seed(_mix(seed, node)) for seed in self.seeds]
        return _draw(gens, self.shape, "cpu", torch.float64)

    def _leaf(self, t: float) -> tuple[float, float, Tensor, Tensor, int]:
        """Descend the tree to the leaf holding t: its ends a, b, the values W(a), W(b) and its node id."""
        a, b = self.t0, self.t1
        w_a = torch.zeros((len(self.seeds), *self.shape), dtype=torch.float64)
        w_b = math.sqrt(b - a) * self._normal(1)
        node = 1  # heap numbering: children of k are 2k and 2k + 1
        for _ in range(self.depth):
            if t in (a, b):
                break
            m = 0.5 * (a + b)
            # Brownian bridge at the midpoint: mean (w_a + w_b) / 2, variance (b - a) / 4.
            w_m = 0.5 * (w_a + w_b) + 0.5 * math.sqrt(b - a) * self._normal(2 * node)
            if t < m:
                b, w_b, node = m, w_m, 2 * node
            else:
                a, w_a, node = m, w_m, 2 * node + 1
        return a, b, w_a, w_b, node

    def _bridge(self, a: float, b: float, w_a: Tensor, w_b: Tensor, t: float, key: int) -> Tensor:
        """W(t) given W(a), W(b): mean lerp, variance (t - a)(b - t) / (b - a), draw seeded by key."""
        if t in (a, b):
            return w_a if t == a else w_b
        frac = (t - a) / (b - a)
        z = self._normal(_mix(key, 1 << 62))
        return (1 - frac) * w_a + frac * w_b + math.sqrt((t - a) * (b - t) / (b - a)) * z

    def _w(self, t: float) -> Tensor:
        a, b, w_a, w_b, node = self._leaf(t)
        # Inside a leaf, mix the float's bits into the node id so distinct t get distinct reproducible draws.
        return self._bridge(a, b, w_a, w_b, t, _mix(node, _bits(t)))

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        s0, s1 = float(sigma), float(sigma_next)
        lo, hi = sorted(min(max(s, self.t0), self.t1) for s in (s0, s1))
        a, b, w_a, w_b, node = self._leaf(lo)
        if lo not in (a, b) and a < hi < b:
            # Both ends inside one leaf: draw W(hi) from the bridge conditioned on W(lo), so the increment
            # has exactly variance hi - lo (independent bridge draws would not).
            w_lo = self.w(lo)
            w_hi = self._bridge(lo, b, w_lo, w_b, hi, _mix(_mix(node, _bits(lo)), _bits(hi)))
            dw = (w_hi - w_lo) if s1 > s0 else (w_lo - w_hi)
        else:
            dw = self.w(s1) - self.w(s0)
        return (dw / math.sqrt(abs(s1 - s0))).to(device=self.device, dtype=self.dtype)


def _bits(t: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", t))[0]
