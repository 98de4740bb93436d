"""The one writer of `.safetensors` files: cast, write to a temporary name, fsync, rename.

A crash or a full disk leaves either the old file or the whole new one, never a truncated model
(the same all-or-nothing rule as the training checkpoints).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file


def tensors_to_save(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; floating ones cast to `dtype` when given."""
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in tensors.items()
    }


def save_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `tensors` (cast to `dtype`) and `metadata` to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors_to_save(tensors, dtype), str(tmp), metadata=dict(metadata or {}))
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; on success it is fsynced and renamed onto `path`
    (all or nothing), on error removed, so a failed or interrupted write never leaves half a file."""
    # the pid keeps two processes writing one name from writing into each other's temporary file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# safetensors' dtype names (the inverse of the reader's table)
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors_streamed(
    path: str | Path,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a `.safetensors` one tensor at a time: `produce(name)` is called in `entries` order.

    The header is written first from the declared (name, dtype, shape), so no more than one produced
    tensor is alive at once; each must match its declaration. Atomic like `save_safetensors`; returns
    the SHA-256 of the whole file (A1111's model hash), computed from the bytes as they are written.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes so the data stays aligned
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:

        def write(data: bytes | memoryview) -> None:
            digest.update(data)
            f.write(data)

        write(len(text).to_bytes(8, "little") + text)
        for name, dtype, shape in entries:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"{name}: produced {tensor.dtype} {list(tensor.shape)}, declared {dtype} {shape}"
                )
            flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            write(flat.numpy().data)
    return digest.hexdigest()
