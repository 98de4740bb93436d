"""Training checkpoints: atomic writes, pruning, RNG state as plain tensors, refusal of inexact resumes.

A checkpoint is `run_dir/checkpoints/step_N.pt` (N = optimizer steps done), written to
`step_N.pt.tmp`, fsynced and renamed, so a crash leaves either the whole file or none. Everything in
it is tensors and plain Python types, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.training.config import RunConfig, exactness_dict

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def remove_temp_files(run_dir: str | os.PathLike) -> None:
    """Delete `*.tmp` left by a process killed while writing a checkpoint."""
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.glob("*.tmp"):
            path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `path.tmp`, fsync, then os.replace onto `path` (all or nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as step_N.pt and keep only the newest `keep` checkpoints (0 = keep all)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step}.pt"
    atomic_save(state, path)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint on the CPU, weights-only (no arbitrary code from the pickle)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def find_latest(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, skipping (with a warning) any that do not."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as error:  # a damaged file: fall back to the previous checkpoint
            message = f"checkpoint {path} (step {step}) does not load ({error}); trying an older one"
            warnings.warn(message, stacklevel=2)
    return None


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain types."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # type: ignore[misc]
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only if the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- resume checks


def check_resumable(
    checkpoint: dict[str, Any], config: RunConfig, world_size: int, dataset_size: int, path: Path
) -> None:
    """Refuse to resume when the run would not continue exactly; the error lists what changed."""
    saved, now = checkpoint["exactness"], exactness_dict(config)
    saved = {**saved, "processes * grad_accum": checkpoint["micro_batches_per_step"]}
    saved["train dataset size"] = checkpoint["dataset_size"]
    now = {**now, "processes * grad_accum": world_size * config.grad_accum}
    now["train dataset size"] = dataset_size
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: these settings changed since it was written, so the run would not "
            f"continue exactly:\n  " + "\n  ".join(changed) + "\nRestore them, or start a new run_dir."
        )
