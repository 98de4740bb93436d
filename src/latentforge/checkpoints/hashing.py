"""Digests of weights: A1111's file hashes ("Model hash", "VAE hash") and the content digest of a module.

A1111 (`modules/hashes.py`, `calculate_sha256`) hashes the whole file with SHA-256 and shows the first
10 hex digits of it as the short hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def a1111_short_hash(path: str | Path) -> str:
    return sha256_file(path)[:10]


def weights_digest(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a module's state dict: names, dtypes, shapes and bytes, in sorted name order."""
    state = module.state_dict() if isinstance(module, nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
