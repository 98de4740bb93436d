"""Encode a dataset once (VAE posteriors, caption tokens or text hidden states) and reuse it every epoch.

A cache lives in `root/<key>/` (one `cache.safetensors` with a row per dataset item), where `key` is a
SHA-256 over the frozen encoders' weights, the dataset listing (paths, sizes, mtimes, captions) and the
encoding options. Any change to any of them gives a new key, so a stale cache is never read; it is
simply not found. Writes are atomic (temporary folder, then rename), so a crash leaves no partial cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

FORMAT_VERSION = 1
CACHE_FILE = "cache.safetensors"
INFO_FILE = "cache.json"


def dataset_fingerprint(dataset: Dataset) -> Any:
    """A JSON-able description that changes whenever the items of `dataset` may change.

    Understands `Subset`, datasets with a `fingerprint()` method, and `ImageFolderDataset` (its entries'
    paths, file sizes, mtimes, captions and repeats, plus its resolution and crop settings).
    """
    if isinstance(dataset, Subset):
        return {"subset": list(map(int, dataset.indices)), "of": dataset_fingerprint(dataset.dataset)}
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return fingerprint()
    entries = getattr(dataset, "entries", None)
    if entries is not None and hasattr(dataset, "sizes"):
        listing = []
        for entry in entries:
            stat = os.stat(entry.path)
            listing.append([str(entry.path), stat.st_size, stat.st_mtime_ns, entry.caption, entry.repeats])
        return {
            "type": type(dataset).__name__,
            "sizes": [list(s) for s in dataset.sizes],
            "center_crop": getattr(dataset, "center_crop", None),
            "flip": getattr(dataset, "flip", None),
            "seed": getattr(dataset, "seed", None),
            "entries": listing,
        }
    raise TypeError(
        f"cannot fingerprint a {type(dataset).__name__} for the latent cache; give it a `fingerprint()` "
        "method returning a JSON-able description of its items, or turn the cache off"
    )


def cache_key(**parts: Any) -> str:
    """SHA-256 (hex, first 24 digits) of the JSON of `parts` (weights digests, fingerprint, options)."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class LatentCache:
    """One cache folder `root/key`; `load()` returns its tensors, `write()` creates it atomically."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.root = Path(root)
        self.key = key
        self.path = self.root / key

    def exists(self) -> bool:
        return (self.path / CACHE_FILE).is_file() and (self.path / INFO_FILE).is_file()

    def load(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / CACHE_FILE))

    def info(self) -> dict[str, Any]:
        return json.loads((self.path / INFO_FILE).read_text())

    def write(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{self.key}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / CACHE_FILE))
        (staging / INFO_FILE).write_text(json.dumps(dict(info), indent=2, sort_keys=True, default=str))
        if self.path.exists():  # another process finished first; theirs is identical
            shutil.rmtree(staging)
            return
        os.replace(staging, self.path)


def encode_dataset(
    dataset: Dataset,
    encode: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run `encode(batch) -> {name: [B, ...]}` over the dataset in order and stack the rows per name."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    columns: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc="caching latents", unit="batch", disable=not progress):
        for name, value in encode(batch).items():
            columns.setdefault(name, []).append(value.detach().cpu())
    return {name: torch.cat(values) for name, values in columns.items()}


def cached_or_encode(
    cache: LatentCache,
    dataset: Dataset,
    encode: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]],
    info: Mapping[str, Any],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, hit): the cache's tensors if present, else encode the dataset, write the cache, return it."""
    if cache.exists():
        return cache.load(), True
    tensors = encode_dataset(dataset, encode, batch_size=batch_size, progress=progress)
    cache.write(tensors, {**info, "items": len(dataset), "columns": sorted(tensors)})  # type: ignore[arg-type]
    return tensors, False


class TensorRowsDataset(Dataset):
    """Items are dicts {name: tensors[name][i]} over columns of equal length (a loaded cache)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"cache columns have different lengths: {lengths}")
        self.tensors = dict(tensors)
        self.length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}
