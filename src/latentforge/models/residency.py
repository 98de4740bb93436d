"""Low-memory mode (`load(low_memory=True)`): only the running network keeps its weights in memory.

Every parameter and buffer of the bundle's networks is a view of a shared mapping of an unlinked file on disk
(not tmpfs or memfd: those pages would only move from the process's RSS to shmem). Residency groups: the text
encoder(s), each top-level block of the U-Net, the VAE. Before a group runs, a forward pre-hook drops the
pages of the other groups from the process (`MADV_DONTNEED` on a `MAP_SHARED` file mapping: the data stays
in the file and the kernel's page cache, RSS falls); touching a dropped page faults it back from the page
cache, or from disk if the kernel evicted it. So releasing never changes a value, only where it lives.
Writes (LoRA patches, their undo) go to the shared mapping like any other write. Measured costs and peaks:
docs/performance.md, "Low-memory mode".
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from latentforge.errors import OutputError

PAGE = mmap.PAGESIZE
CHUNK_BYTES = 256 * 2**20  # mappings grow by at least this much (disk space is allocated as written)
TRIM_BYTES = 64 * 2**20  # while loading, the free heap is returned after every this many bytes put


def default_directory() -> Path:
    """Where the backing files are created (and unlinked at once): $XDG_CACHE_HOME/latentforge/low-memory."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentforge" / "low-memory"


def supported() -> bool:
    """`madvise(MADV_DONTNEED)` on a shared mapping (Linux, macOS; not Windows)."""
    return hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


@dataclass
class _Chunk:
    """One shared mapping of bytes [offset, offset + size) of the backing file."""

    mapping: mmap.mmap
    base: int  # address of its first byte
    size: int
    offset: int  # in the file
    used: int = 0


@dataclass
class _File:
    """An unlinked file and its mappings, filled front to back with page-aligned tensors."""

    fd: int
    chunks: list[_Chunk] = field(default_factory=list)
    length: int = 0

    def __del__(self) -> None:  # the mappings stay valid after close; the space goes with the last of them
        os.close(self.fd)


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class Residency:
    """The backing files of a bundle's weights and which residency group ("text", "unet", "vae") runs."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.loading = self._new_file()  # what `put` fills while a checkpoint is read
        # group -> its page ranges (chunk, start, length) and the file made for it by `place`, if any
        self.ranges: dict[str, list[tuple[_Chunk, int, int]]] = {}
        self.own_files: dict[str, _File] = {}
        self.hooks: dict[str, list[RemovableHandle]] = {}  # the pre-hooks `place` added, by group
        self.active: str | None = None
        self.staging: torch.Tensor | None = None  # see `put`; dropped by `loaded`
        self.unreturned = 0  # bytes `put` since the heap was last trimmed

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A folder or disk that cannot take the backing file: one clear error, not a traceback."""
        try:
            yield
        except OSError as e:
            raise OutputError(
                f"low-memory mode cannot write its weights file in {self.directory} ({e.strerror or e}): "
                "free disk space there or point XDG_CACHE_HOME at a writable disk"
            ) from None

    def _new_file(self) -> _File:
        with self._writing():
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="weights-", dir=self.directory)
            os.unlink(name)  # gone with the process, however it ends
        return _File(fd)

    def put(
        self, tensor: torch.Tensor, dtype: torch.dtype | None = None, file: _File | None = None
    ) -> torch.Tensor:
        """A copy of `tensor` (cast to `dtype`) in a backing file, by `pwrite`: its pages never enter this
        process. A cast or reordered tensor is staged in one reused buffer: a fresh allocation per tensor,
        freed at once, leaves glibc's heap fragmented (750 MiB of RSS after loading SD1.5 in bf16)."""
        file = file or self.loading
        dtype = dtype or tensor.dtype
        nbytes = tensor.numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(tensor.shape, dtype=dtype)
        source = tensor.detach()
        if dtype != tensor.dtype or not tensor.is_contiguous():
            if self.staging is None or self.staging.numel() < nbytes:
                self.staging = None
                self.staging = torch.empty(nbytes, dtype=torch.uint8)
            source = self.staging[:nbytes].view(dtype).view(tensor.shape)
            source.copy_(tensor)  # the conversion `tensor.to(dtype)` makes
        chunk = file.chunks[-1] if file.chunks else None
        with self._writing():
            if chunk is None or chunk.size - chunk.used < nbytes:
                size = max(CHUNK_BYTES, _round_up(nbytes))
                os.ftruncate(file.fd, file.length + size)  # sparse: disk space only as pages are written
                mapping = mmap.mmap(file.fd, size, flags=mmap.MAP_SHARED, offset=file.length)
                base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
                chunk = _Chunk(mapping, base, size, file.length)
                file.chunks.append(chunk)
                file.length += size
            start = chunk.used
            data = source.reshape(-1).view(torch.uint8).numpy().data  # the bytes, as a memoryview
            written = 0
            while written < nbytes:
                written += os.pwrite(file.fd, data[written:], chunk.offset + start + written)
        chunk.used = start + _round_up(nbytes)
        self.unreturned += nbytes
        if self.unreturned > TRIM_BYTES:  # what a quantizer allocated per tensor, freed: give it back
            self.unreturned = 0
            _trim_heap()
        view = torch.frombuffer(chunk.mapping, dtype=torch.uint8, count=nbytes, offset=start)
        return view.view(source.dtype).view(source.shape)

    def loaded(self) -> None:
        """Loading is over: drop the staging buffer and return glibc's free heap pages to the system."""
        self.staging = None
        _trim_heap()

    def _locate(self, tensor: torch.Tensor) -> tuple[_Chunk, int, int] | None:
        """(chunk, first page, page-rounded length) of the storage behind `tensor`, if in a backing file."""
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        files = [self.loading, *self.own_files.values()]
        for chunk in (c for f in files for c in f.chunks):
            if chunk.base <= address < chunk.base + chunk.size:
                start = (address - chunk.base) // PAGE * PAGE
                return chunk, start, min(_round_up(address - chunk.base + nbytes), chunk.size) - start
        return None

    def place(self, group: str, *modules: nn.Module) -> None:
        """Make `modules` the weights of `group`: tensors not yet in a backing file are copied into a file of
        the group's own (replacing the group's previous one, e.g. a swapped VAE), and a pre-hook on every
        submodule holding tensors switches residency to `group` when it runs."""
        self.release(group)  # the group's previous tensors (a VAE set aside) leave the process first
        self.own_files.pop(group, None)  # a previous placement's file goes with its tensors
        for handle in self.hooks.pop(group, []):
            handle.remove()
        hooks = self.hooks[group] = []
        ranges: list[tuple[_Chunk, int, int]] = []
        for module in modules:
            for sub in module.modules():
                tensors = [*sub._parameters.items(), *sub._buffers.items()]
                for name, tensor in tensors:
                    if tensor is None or tensor.numel() == 0:
                        continue
                    where = self._locate(tensor)
                    if where is None:
                        if group not in self.own_files:
                            self.own_files[group] = self._new_file()
                        placed = self.put(tensor, file=self.own_files[group])
                        if name in sub._parameters:
                            tensor.data = placed  # the same Parameter object: references to it stay valid
                        else:
                            sub._buffers[name] = placed
                        where = self._locate(placed)
                    assert where is not None
                    ranges.append(where)
                if tensors:
                    hooks.append(sub.register_forward_pre_hook(self._switch_to(group)))
        self.ranges[group] = _merged(ranges)
        self.release(group)

    def _switch_to(self, group: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: object) -> None:
            if self.active != group:
                self.use(group)

        return hook

    def use(self, group: str) -> None:
        """`group` is about to run: drop every other group's pages from the process; from one network to
        another (text -> U-Net -> VAE), also the heap the last one's activations freed (int8 dequantized
        weights left 250 MiB there at 512 px, which the VAE decode would have stacked its peak on)."""
        previous = self.active
        self.release(*(g for g in self.ranges if g != group))
        if previous is None or previous.split(".")[0] != group.split(".")[0]:
            _trim_heap()
        self.active = group

    def release(self, *groups: str) -> None:
        """Drop the pages of `groups` from the process; the file and the page cache keep them."""
        for group in groups:
            for chunk, start, length in self.ranges.get(group, []):
                chunk.mapping.madvise(mmap.MADV_DONTNEED, start, length)
            if self.active == group:
                self.active = None


def _trim_heap() -> None:
    """Return glibc's free heap pages to the system (`malloc_trim`; a no-op elsewhere)."""
    if sys.platform == "linux":
        with contextlib.suppress(AttributeError, OSError):  # glibc's; musl has none
            ctypes.CDLL(None).malloc_trim(0)


def blocks(group: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """`module` as residency groups of its top-level blocks (each element of a ModuleList its own:
    `unet.input_blocks.3`), or whole when it holds tensors of its own."""
    if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None):
        return [(group, module)]
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        items = list(child.named_children()) if type(child) is nn.ModuleList else [("", child)]
        out += [(".".join(filter(None, (group, name, index))), sub) for index, sub in items]
    return out


def _merged(ranges: list[tuple[_Chunk, int, int]]) -> list[tuple[_Chunk, int, int]]:
    """Page ranges sorted and joined where they touch or overlap (fewer madvise calls)."""
    out: list[tuple[_Chunk, int, int]] = []
    for chunk, start, length in sorted(ranges, key=lambda r: (id(r[0]), r[1])):
        if out and out[-1][0] is chunk and start <= out[-1][1] + out[-1][2]:
            previous = out[-1]
            out[-1] = (chunk, previous[1], max(previous[1] + previous[2], start + length) - previous[1])
        else:
            out.append((chunk, start, length))
    return out
