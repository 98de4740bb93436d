"""A weights file whose tensors are read one at a time, by name (what streamed merging needs).

`.safetensors`: the header is validated whole first (`reading.parse_safetensors_header`), then each tensor is
read by offset into fresh memory; nothing else of the file is held. `.ckpt`/`.pt`: the weights-only
unpickler with the zip file memory-mapped (a legacy, non-zip pickle has to be read whole). Key spellings of
old exports are normalised as A1111's `checkpoint_dict_replacements` (`modules/sd_models.py`) do.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from latentforge.checkpoints.errors import CheckpointNotFoundError, CorruptCheckpointError
from latentforge.checkpoints.reading import TensorEntry, _read_torch, parse_safetensors_header, sniff

# transformers < 4.21 exports lack the `text_model.` level (A1111 `checkpoint_dict_replacements`)
_REPLACEMENTS = tuple(
    (f"cond_stage_model.transformer.{part}", f"cond_stage_model.transformer.text_model.{part}")
    for part in ("embeddings.", "encoder.", "final_layer_norm.")
)


def normalise_key(key: str) -> str:
    for old, new in _REPLACEMENTS:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf: one float32 sum (NaN and Inf propagate into it), checked exactly only if that overflows."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


class TensorFile:
    """Names, shapes and dtypes of a weights file up front; `read(name)` one tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointNotFoundError(
                self.path,
                "is a folder; merging works on single files (`latentforge convert --to single-file` first)",
            )
        if not self.path.is_file():
            raise CheckpointNotFoundError(self.path, "no such file")
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._data_start = 0
        if sniff(self.path) == "safetensors":
            with self.path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                size = self.path.stat().st_size
                if length > size - 8:
                    raise CorruptCheckpointError(self.path, f"header of {length} bytes in a {size}-byte file")
                entries, self.metadata = parse_safetensors_header(
                    self.path, f.read(length), size - 8 - length
                )
            self._data_start = 8 + length
            self._entries = {normalise_key(e.name): e for e in entries}
            self.names = {key: (e.dtype, e.shape) for key, e in self._entries.items()}
        else:
            self._tensors = {normalise_key(k): v for k, v in _read_torch(self.path).items()}
            self.names = {key: (t.dtype, tuple(t.shape)) for key, t in self._tensors.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def shape(self, key: str) -> tuple[int, ...]:
        return self.names[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.names[key][0]

    def read(self, key: str, *, check: bool = True) -> torch.Tensor:
        """Tensor `key` in memory of its own; with `check`, NaN/Inf in a floating tensor is refused."""
        if key in self._tensors:
            tensor = self._tensors[key].clone(memory_format=torch.contiguous_format)
        else:
            entry = self._entries[key]
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            view = tensor.reshape(-1).view(torch.uint8).numpy().data
            with self.path.open("rb", buffering=0) as f:
                f.seek(self._data_start + entry.begin)
                done = 0
                while done < len(view):
                    count = f.readinto(view[done:])
                    if not count:
                        raise CorruptCheckpointError(self.path, f"truncated while reading {key}")
                    done += count
        if check and tensor.is_floating_point() and not all_finite(tensor):
            raise CorruptCheckpointError(self.path, f"{key} holds NaN or Inf values; nothing was written")
        return tensor

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor as a `meta` tensor of its shape: for family detection without reading weights."""
        return {
            key: torch.empty(shape, dtype=dtype, device="meta") for key, (dtype, shape) in self.names.items()
        }
