"""One request's images made by several processes (torchrun), the same images as one process makes.

The runner cuts a request's images into batches as one process does (`request._batches`: image i in
batch i // batch_size); rank r of n makes a contiguous run of those batches, the first n_batches % n
ranks one batch more. So every image is made in the same batch, from the same seed, as in one process,
and keeps its position in the full list (`GeneratedImage.index`), which names its file: no two ranks
write one name and nothing is numbered while they run. Randomly drawn seeds are drawn once, on rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from latentforge import distributed
from latentforge.errors import LatentforgeError, ParameterError
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.seeds import resolve_seed

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Part `rank` of `count` of a request's batches (the whole request by default)."""

    rank: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, total: int) -> range:
        """The indices of this part's batches among `total`."""
        size, extra = divmod(total, self.count)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (self.rank < extra))

    def images(self, total: int, batch_size: int) -> range:
        """The indices of this part's images among `total` made `batch_size` at a time."""
        part = self.batches(-(-total // batch_size))
        return range(min(part.start * batch_size, total), min(part.stop * batch_size, total))


@contextmanager
def sharded(device: str | None) -> Iterator[tuple[Shard, str]]:
    """This process's shard and device for the duration of a command.

    One process (no torchrun, or WORLD_SIZE 1): the whole request on `device` (default cuda when
    available, else cpu). Under torchrun: join the process group (`latentforge.distributed.setup`: nccl
    on CUDA, gloo on CPU), one GPU per local rank (cuda:LOCAL_RANK) or, on CPU, this process's share of
    the machine's cores (`distributed.cpu_thread_share`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield Shard(), device or ("cuda" if torch.cuda.is_available() else "cpu")
        return
    if device not in (None, "auto", "cpu", "cuda"):
        raise ParameterError(
            f"under torchrun --device is cpu or cuda (one GPU per local rank), not {device!r}"
        )
    info = distributed.setup(device or "auto")
    try:
        threads = distributed.cpu_thread_share() if info.device.type == "cpu" else None
        if threads is not None:
            torch.set_num_threads(threads)
        yield Shard(info.rank, info.world_size), str(info.device)
    finally:
        distributed.teardown(info)


def agreed_seeds(request: GenerationRequest) -> GenerationRequest:
    """The request with its random seeds (-1) drawn on rank 0 and the same on every rank."""
    seeds = (
        resolve_seed(request.seed),
        resolve_seed(request.subseed) if request.subseed_strength > 0 else request.subseed,
    )
    seed, subseed = distributed.broadcast_object(seeds)
    return replace(request, seed=seed, subseed=subseed)


def on_main(action: Callable[[], T]) -> T:
    """`action()` run by rank 0 alone (e.g. clearing a folder); its result, or its error, on every rank."""
    outcome: tuple[T | None, str | None] = (None, None)
    failure: LatentforgeError | None = None
    if distributed.rank() == 0:
        try:
            outcome = (action(), None)
        except LatentforgeError as e:
            failure, outcome = e, (None, str(e))
    result, message = distributed.broadcast_object(outcome)
    if failure is not None:
        raise failure
    if message is not None:
        raise LatentforgeError(message)
    return result  # type: ignore[no-any-return]  # T, made by rank 0
