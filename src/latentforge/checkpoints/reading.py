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
from collections.abc import Callable
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
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


def read_state_dict(
    path: str | Path, *, dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None
) -> tuple[StateDict, dict[str, str]]:
    """Return (tensors, metadata) from a weights file, checking it is what it claims to be.

    `keep(key)` False skips a tensor without reading it; floating tensors are cast to `dtype` one at a
    time as they are read, so the file's copy and the cast copy never both exist in full.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(path, "no such file" if not path.exists() else "not a file")
    kind = sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path, dtype, keep)
    tensors = _read_torch(path)
    return {k: _private_copy(v, dtype) for k, v in tensors.items() if keep is None or keep(k)}, {}


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
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _read_safetensors(
    path: Path, dtype: torch.dtype | None, keep: Callable[[str], bool] | None
) -> tuple[StateDict, dict[str, str]]:
    """Read each kept tensor straight into its own storage (no whole-file buffer, no second copy).

    One storage per tensor, unlike views of one big buffer, lets a cast free its source at once and
    keeps skipped tensors (EMA, training buffers) and later-replaced ones (a swapped VAE) out of memory.
    """
    size = path.stat().st_size
    with path.open("rb", buffering=0) as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            message = f"safetensors header of {header_len} bytes in a {size}-byte file"
            raise CorruptCheckpointError(path, message)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(path, f"unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CorruptCheckpointError(path, "the safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_len = size - 8 - header_len
        needed = max((_entry_end(path, k, v) for k, v in header.items()), default=0)
        if needed > data_len:
            raise CorruptCheckpointError(
                path, f"truncated: the header describes {needed} bytes of data, the file has {data_len}"
            )
        tensors = {}
        largest = max((e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()), default=0)
        scratch = None  # one reusable buffer for the file's copy of cast tensors: no holes left in the heap
        for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if keep is not None and not keep(key):
                continue
            file_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            cast = dtype is not None and dtype != file_dtype and file_dtype.is_floating_point
            if cast:
                scratch = torch.empty(largest, dtype=torch.uint8) if scratch is None else scratch
                tensor = scratch[: end - begin].view(file_dtype).view(entry["shape"])
            else:
                tensor = torch.empty(entry["shape"], dtype=file_dtype)  # read straight into its final place
            if end > begin:
                f.seek(8 + header_len + begin)
                _read_exactly(f, tensor, path)
            tensors[key] = tensor.to(dtype) if cast else tensor
    return {k: tensors[k] for k in header if k in tensors}, {str(k): str(v) for k, v in metadata.items()}


def _read_exactly(f: RawIOBase, tensor: torch.Tensor, path: Path) -> None:
    """Fill a fresh contiguous tensor from the file (readinto may return short counts)."""
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, writable
    done = 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise CorruptCheckpointError(path, "truncated while reading")
        done += count


def _entry_end(path: Path, key: str, entry: object) -> int:
    """Validate one header entry and return where its bytes end."""
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]  # type: ignore[index]
        begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
        numel = 1
        for dim in entry["shape"]:  # type: ignore[index]
            numel *= int(dim)
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(path, f"malformed safetensors entry for {key!r}") from None
    if begin < 0 or end - begin != numel * dtype.itemsize:
        raise CorruptCheckpointError(path, f"tensor {key!r} has inconsistent offsets for its shape and dtype")
    return end


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


def _read_torch(path: Path) -> StateDict:
    """The tensors of a PyTorch pickle, copied out of the file's memory map.

    The zip format is mapped (`mmap=True`) so that tensors we skip are never read; every tensor we
    return is then copied into memory of its own, so a later change to the file on disk cannot
    crash the process with SIGBUS (issue 19) through a page still backed by the file.
    """
    try:
        with torch.serialization.safe_globals(LIGHTNING_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            path,
            "the pickle asks for more than tensors, so it was not loaded (it could run code). "
            f"Convert it to .safetensors with a tool you trust. Detail: {str(e).splitlines()[0]}",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(path, f"unreadable PyTorch checkpoint ({e})") from None
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
