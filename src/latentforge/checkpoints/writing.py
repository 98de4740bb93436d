"""The one writer of `.safetensors` files: cast, write to a temporary name, fsync, rename.

A crash or a full disk leaves either the old file or the whole new one, never a truncated model
(the same all-or-nothing rule as the training checkpoints).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
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
    # the pid keeps two processes exporting to one name from writing into each other's temporary file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors_to_save(tensors, dtype), str(tmp), metadata=dict(metadata or {}))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
