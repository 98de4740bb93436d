"""Aspect-ratio buckets (as in kohya's sd-scripts and NovelAI's write-up) and a per-bucket batch sampler.

A bucket is a (width, height) whose area is at most resolution**2, both sides multiples of `step`
and within [min_side, max_side]. Each image goes to the bucket nearest in log aspect ratio; a batch
holds images of one bucket only, so every tensor in it has the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def default_step(resolution: int) -> int:
    """64 (the SD latent grid times 8) for real resolutions, 8 for tiny test models below 256."""
    return 64 if resolution >= 256 else 8


def make_buckets(
    resolution: int,
    *,
    step: int | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
) -> list[tuple[int, int]]:
    """All (width, height) buckets for a square `resolution` area budget, sorted by aspect ratio.

    Defaults: `step` from `default_step`, min_side = resolution // 2, max_side = resolution * 2
    (kohya's 256 and 1024 at 512), each rounded to the step.
    """
    step = step or default_step(resolution)
    min_side = max(step, (min_side or resolution // 2) // step * step)
    max_side = (max_side or resolution * 2) // step * step
    if min_side > max_side or resolution < step:
        raise ValueError(f"no buckets for resolution={resolution}, step={step}, sides {min_side}..{max_side}")
    area = resolution * resolution
    square = min(max_side, max(min_side, math.isqrt(area) // step * step))
    buckets = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket nearest to width/height in log aspect ratio (ties: the first, i.e. taller)."""
    aspect = math.log(width / height)
    errors = [abs(aspect - math.log(bw / bh)) for bw, bh in buckets]
    return int(np.argmin(errors))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share a bucket, shuffled by (seed, epoch), sharded for DDP.

    Every rank yields the same number of batches: the shuffled batch list is padded by repeating its
    start (or truncated with `drop_last`) to a multiple of `world_size`, then rank r takes every
    world_size-th batch from r, as `torch.utils.data.DistributedSampler` does with samples.
    `drop_last` also drops each bucket's final incomplete batch. Call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.bucket_ids = list(bucket_ids)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_ids):
            members.setdefault(bucket, []).append(index)
        self._members = dict(sorted(members.items()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for indices in self._members.values():
            order = rng.permutation(len(indices)) if self.shuffle else np.arange(len(indices))
            shuffled = [indices[i] for i in order]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _num_batches_total(self) -> int:
        full, partial = 0, 0
        for indices in self._members.values():
            full += len(indices) // self.batch_size
            partial += int(len(indices) % self.batch_size != 0)
        return full if self.drop_last else full + partial

    def __len__(self) -> int:
        total = self._num_batches_total()
        return total // self.world_size if self.drop_last else math.ceil(total / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_rank = len(self)
        wanted = per_rank * self.world_size
        if batches and len(batches) < wanted:  # pad by cycling from the start
            batches = [batches[i % len(batches)] for i in range(wanted)]
        yield from batches[:wanted][self.rank :: self.world_size]


def bucket_batch_order(
    bucket_ids: Sequence[int], batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """An epoch's item order whose consecutive `batch_size` chunks each hold one bucket.

    Each bucket's items are permuted and cut into full batches (a bucket's remainder waits for a later
    epoch's permutation, as kohya drops it), then the batches are permuted: a pure function of the
    generator, so the training loop's exact resume holds with buckets.
    """
    ids = torch.as_tensor(list(bucket_ids), dtype=torch.long)
    batches: list[torch.Tensor] = []
    for bucket in torch.unique(ids).tolist():
        members = torch.nonzero(ids == bucket).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        full = len(members) // batch_size * batch_size
        batches.extend(members[:full].split(batch_size))
    if not batches:
        return torch.empty(0, dtype=torch.long)
    order = torch.randperm(len(batches), generator=generator)
    return torch.cat([batches[i] for i in order.tolist()])
