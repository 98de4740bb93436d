"""Read tensors from `.safetensors` and `.ckpt` files without ever running pickle code.

`.ckpt`/`.pt`/`.pth` go through `torch.load(weights_only=True)` only, with an explicit allow-list of
the few harmless globals Lightning checkpoints contain (mapped to inert stand-ins); there is no unsafe
fallback.
Files are sniffed first, so a git-lfs pointer or an HTML page saved under a model name gets an error
that says so instead of a parser's complaint.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import RawIOBase
from pathlib import Path

import torch

from latentforge.checkpoints.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotAWeightsFileError,
    UnsafeCheckpointError,
)

StateDict = dict[str, torch.Tensor]
# convert(key, tensor as stored in the file, target dtype): the entries that replace the tensor (made from
# it, in memory of their own: the tensor may be a reused buffer or the file's mapping), or None to keep it
Convert = Callable[[str, torch.Tensor, torch.dtype | None], StateDict | None]
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


def read_state_dict(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    keep: Callable[[str], bool] | None = None,
    convert: Convert | None = None,
) -> tuple[StateDict, dict[str, str]]:
    """Return (tensors, metadata) from a weights file, checking it is what it claims to be.

    `keep(key)` False skips a tensor without reading it; floating tensors are cast to `dtype` one at a
    time as they are read, so the file's copy and the cast copy never both exist in full. `convert`
    (e.g. int8 quantization at load) replaces a tensor by its entries as soon as it is read, from the
    file's copy: only what is kept is ever allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(path, "no such file" if not path.exists() else "not a file")
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path, dtype, keep, convert)
    out: StateDict = {}
    for k, v in _read_torch(path).items():
        if keep is None or keep(k):
            converted = convert(k, v, dtype) if convert is not None else None
            out.update(converted if converted is not None else {k: _private_copy(v, dtype)})
    return out, {}


def _private_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A copy in fresh memory (cast to `dtype` when floating): never a view of the file's mapping."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(dtype, copy=True)
    return tensor.clone(memory_format=torch.contiguous_format)


def sniff(path: Path) -> str:
    """Tell `safetensors` from `torch` (zip or legacy pickle) by content, not by extension."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        raise CorruptCheckpointError(path, "the file is empty")
    if head.startswith(b"version https://git-lfs"):
        raise NotAWeightsFileError(path, "this is a git-lfs pointer, not the weights; run `git lfs pull`")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"{")):
        raise NotAWeightsFileError(
            path, "this is a web page or text document, not model weights (did a download fail?)"
        )
    if head.startswith(b"PK\x03\x04") or head[:2] == b"\x80\x02":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise NotAWeightsFileError(path, "not a .safetensors or PyTorch checkpoint file")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_RANK = 64  # more dimensions than any tensor has (and torch's own limit)
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """One validated tensor of a safetensors header: bytes [begin, end) of the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_safetensors_header(
    path: str | Path, header: bytes, data_len: int
) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validate a safetensors JSON header completely before any tensor is read or allocated.

    Each entry needs a known dtype, a shape of non-negative ints and offsets with
    dtype size x numel == end - begin; sorted by offset, the entries must tile the data section
    exactly: the first starts at 0, each starts where the previous ends (no gap, no overlap), the
    last ends at `data_len` (nothing missing, nothing after). Returns (entries in file order, metadata).
    """
    try:
        parsed = json.loads(header, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError as e:
        raise CorruptCheckpointError(path, f"safetensors header names {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CorruptCheckpointError(path, f"unreadable safetensors header ({detail})") from None
    if not isinstance(parsed, dict):
        raise CorruptCheckpointError(
            path, f"the safetensors header is a JSON {type(parsed).__name__}, not an object"
        )
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(path, "safetensors __metadata__ must map names to strings")
    entries = [_entry(path, name, value, data_len) for name, value in parsed.items()]
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            where = f"starts at data byte {entry.begin}, the previous tensor ends at {position}"
            raise CorruptCheckpointError(path, f"tensor {entry.name[:200]!r} {what} ({where})")
        position = entry.end
    if position != data_len:
        if position > data_len:
            message = f"truncated: the header describes {position} bytes of data, the file has {data_len}"
        else:
            message = f"{data_len - position} bytes after the last tensor's data (the file was appended to)"
        raise CorruptCheckpointError(path, message)
    return entries, dict(metadata)


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _entry(path: str | Path, name: str, value: object, data_len: int) -> TensorEntry:
    """One header entry, checked field by field; the error names the tensor and the field."""

    def fail(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(path, f"tensor {name[:200]!r}: {what}")

    if not isinstance(value, dict) or set(value) != _ENTRY_FIELDS:
        raise fail(f"entry must be an object with exactly {sorted(_ENTRY_FIELDS)}")
    dtype_name, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise fail(f"unknown dtype {str(dtype_name)[:40]!r} (known: {', '.join(_SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK:
        raise fail(f"shape must be a list of at most {_MAX_RANK} sizes")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise fail(f"shape {str(shape)[:80]} has a size that is not a non-negative integer")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise fail("data_offsets must be two integers [begin, end]")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise fail(f"data_offsets [{begin}, {end}] are negative or reversed")
    if end > data_len:
        raise fail(f"data_offsets [{begin}, {end}] reach past the {data_len} bytes of data (truncated file?)")
    dtype = _SAFETENSORS_DTYPES[dtype_name]
    numel = 0 if 0 in shape else 1
    for size in shape if numel else ():
        numel *= size
        if numel * dtype.itemsize > data_len:  # stop early: a hostile shape may multiply to 10**1000
            raise fail(f"shape {str(shape)[:80]} of {dtype_name} is larger than the whole file")
    if numel * dtype.itemsize != end - begin:
        raise fail(
            f"shape {shape} of {dtype_name} needs {numel * dtype.itemsize} bytes, "
            f"data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _read_safetensors(
    path: Path, dtype: torch.dtype | None, keep: Callable[[str], bool] | None, convert: Convert | None = None
) -> tuple[StateDict, dict[str, str]]:
    """Read each kept tensor straight into its own storage (no whole-file buffer, no second copy).

    The header is validated completely first (`parse_safetensors_header`), so no allocation exceeds
    what the file holds. One storage per tensor, unlike views of one big buffer, lets a cast free its
    source at once and keeps skipped tensors (EMA, training buffers) out of memory.
    """
    size = path.stat().st_size
    with path.open("rb", buffering=0) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(path, f"a {size}-byte file is too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            message = f"safetensors header of {header_len} bytes in a {size}-byte file"
            raise CorruptCheckpointError(path, message)
        entries, metadata = parse_safetensors_header(path, f.read(header_len), size - 8 - header_len)
        tensors: dict[str, StateDict] = {}
        largest = max((e.end - e.begin for e in entries), default=0)
        scratch = None  # one reusable buffer for the file's copy of cast tensors: no holes left in the heap
        for entry in sorted(entries, key=lambda e: e.begin):
            if keep is not None and not keep(entry.name):
                continue
            cast = dtype is not None and dtype != entry.dtype and entry.dtype.is_floating_point
            in_scratch = cast or convert is not None
            if in_scratch:
                scratch = torch.empty(largest, dtype=torch.uint8) if scratch is None else scratch
                tensor = scratch[: entry.end - entry.begin].view(entry.dtype).view(entry.shape)
            else:
                tensor = torch.empty(entry.shape, dtype=entry.dtype)  # read straight into its final place
            if entry.end > entry.begin:
                f.seek(8 + header_len + entry.begin)
                _read_exactly(f, tensor, path)
            converted = convert(entry.name, tensor, dtype) if convert is not None else None
            if converted is None:  # out of the scratch buffer: cast, or copied when `convert` kept it
                own = tensor.to(dtype) if cast else tensor.clone() if in_scratch else tensor
                converted = {entry.name: own}
            tensors[entry.name] = converted
    out: StateDict = {}
    for e in entries:  # the header's order
        out.update(tensors.get(e.name, {}))
    return out, metadata


def _read_exactly(f: RawIOBase, tensor: torch.Tensor, path: Path) -> None:
    """Fill a fresh contiguous tensor from the file (readinto may return short counts)."""
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, writable
    done = 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise CorruptCheckpointError(path, "truncated while reading")
        done += count


class InertObject:
    """Stand-in for a harmless class a Lightning checkpoint pickles beside its tensors: it keeps the
    arguments and state it is given and runs nothing (the real class is never imported)."""

    def __init__(self, *args: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


def _inert_scalar(dtype: object, data: object = None) -> InertObject:
    return InertObject(dtype, data)


# The globals of the original CompVis/Stability `.ckpt` (e.g. sd-v1-4.ckpt) beyond tensors: Lightning's
# `callbacks` entry keyed by the ModelCheckpoint class, and numpy scalars (`numpy.core.multiarray.scalar`
# built from a `numpy.dtype`). Each name maps to an inert stand-in; anything else is still refused by
# torch's weights-only unpickler. A1111 (`modules/safe.py`) and ComfyUI allow the same names.
LIGHTNING_SAFE_GLOBALS: list[Callable[..., object] | tuple[Callable[..., object], str]] = [
    (InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_inert_scalar, "numpy.core.multiarray.scalar"),
    (_inert_scalar, "numpy._core.multiarray.scalar"),  # the same written by numpy >= 2
    (InertObject, "numpy.dtype"),
]


def load_torch_pickle(
    path: Path, safe_globals: Sequence[Callable[..., object] | tuple[Callable[..., object], str]] = ()
) -> object:
    """The object of a PyTorch pickle through torch's weights-only unpickler (never running file code).

    `safe_globals` adds inert stand-ins for more harmless names (e.g. a pickled `ParameterDict`).
    """
    try:
        with torch.serialization.safe_globals([*LIGHTNING_SAFE_GLOBALS, *safe_globals]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            path,
            "the pickle asks for more than tensors, so it was not loaded (it could run code). "
            f"Convert it to .safetensors with a tool you trust. Detail: {str(e).splitlines()[0]}",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(path, f"unreadable PyTorch checkpoint ({e})") from None


def _read_torch(path: Path) -> StateDict:
    """The tensors of a PyTorch pickle, copied out of the file's memory map.

    The zip format is mapped (`mmap=True`) so that tensors we skip are never read; every tensor we
    return is then copied into memory of its own, so a later change to the file on disk cannot
    crash the process with SIGBUS (issue 19) through a page still backed by the file.
    """
    obj = load_torch_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CorruptCheckpointError(path, "the checkpoint holds no tensors")
    return tensors


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"
