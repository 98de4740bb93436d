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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.errors import LatentforgeError
from latentforge.training.config import RunConfig, exactness_dict

_NAME = re.compile(r"^step_(\d+)\.pt$")


def _describe(path: Path, error: Exception) -> str:
    """One line for a load failure: torch's messages run to a dozen lines of advice on weights_only."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged
        return f"not a whole torch.save archive (damaged or truncated: {path.stat().st_size} bytes)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class CheckpointsUnloadable(LatentforgeError):
    """Checkpoints exist but none loads: the run refuses to start over silently."""


class ResumeMismatch(LatentforgeError, ValueError):
    """A resume whose settings differ from the checkpoint's in a way that changes the numbers."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


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
    """Write `state` as step_N.pt, read it back, and only then prune to the newest `keep` (0 = keep all).

    A checkpoint that does not read back is kept with a warning and nothing is pruned, so the newest
    loadable checkpoint (such as the one the run resumed from) is never deleted.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step}.pt"
    atomic_save(state, path)
    problem = _load_problem(path, step)
    if problem is not None:
        warnings.warn(
            f"checkpoint {path} was written but does not load back ({problem}); "
            "no older checkpoint is deleted until one does (check the disk)",
            stacklevel=2,
        )
        return path
    if keep > 0:
        older = [p for _, p in list_checkpoints(run_dir) if p != path]
        for old in older[: max(0, len(older) - (keep - 1))]:  # oldest first: a kill mid-way keeps the newer
            old.unlink(missing_ok=True)
    return path


REQUIRED_KEYS = ("model", "optimizer", "step", "rng", "exactness", "micro_batches_per_step", "dataset_size")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint on the CPU, weights-only (no arbitrary code from the pickle)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_problem(path: Path, step: int | None = None, state: dict[str, Any] | None = None) -> str | None:
    """Why `path` cannot be resumed from (None if it can); memory-maps the tensors instead of reading them."""
    try:
        if state is None:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any failure of a damaged file (zip, pickle, storage) is reported, not raised
        return _describe(path, error)
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a training checkpoint"
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        return f"not a training checkpoint of this version (missing {', '.join(missing)})"
    if step is not None and state["step"] != step:
        return f"holds step {state['step']}, not {step}"
    return None


@dataclass
class ResumePoint:
    """The newest checkpoint that loads, and the newer ones that did not (with why)."""

    path: Path
    state: dict[str, Any]
    unloadable: list[tuple[Path, str]]


def find_latest(run_dir: str | os.PathLike) -> ResumePoint | None:
    """The newest checkpoint that loads (None when there are none), warning about each newer one that does
    not; raises CheckpointsUnloadable, naming each file and why, when checkpoints exist but none loads."""
    failed: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except Exception as error:  # a damaged file: fall back to the previous checkpoint
            problem = _describe(path, error)
        else:
            found = _load_problem(path, step, state)
            if found is None:
                for bad, problem in failed:  # warned only now: with no loadable one the error says it all
                    message = (
                        f"checkpoint {bad} (step {_step_of(bad)}) does not load ({problem}); using {path}"
                    )
                    warnings.warn(message, stacklevel=2)
                return ResumePoint(path, state, failed)
            problem = found
        failed.append((path, problem))
    if failed:
        listing = "; ".join(f"{path.name}: {problem}" for path, problem in failed)
        raise CheckpointsUnloadable(
            f"none of the {len(failed)} checkpoints in {checkpoint_dir(run_dir)} loads ({listing}); "
            "refusing to start the run over. To start over anyway, run again with --restart "
            "(or the override restart=true): the old checkpoints and log are then moved to "
            f"{Path(run_dir) / 'before-restart-N'}"
        )
    return None


def set_aside(path: Path) -> Path:
    """Rename an unloadable checkpoint to `step_N.pt.unloadable`, out of resume and pruning, not deleted."""
    target = path.with_name(path.name + ".unloadable")
    os.replace(path, target)
    return target


# Everything a run writes into run_dir; `archive_run` moves these away for an explicit restart. Not
# DreamBooth's class_images/: generated by the base model, reused by a restart (their manifest says how).
RUN_FILES = (
    "checkpoints",
    "log.csv",
    "config.toml",
    "samples",
    "tensorboard",
    "final.safetensors",
    "embeddings",
    "class_images",
)


def archive_run(run_dir: str | os.PathLike) -> Path | None:
    """Move a previous run's files into `run_dir/before-restart-N/` (N = 1, 2, ...); None if none."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / f"before-restart-{n}").exists():
        n += 1
    archive = run_dir / f"before-restart-{n}"
    archive.mkdir()
    for name in present:
        os.replace(run_dir / name, archive / name)
    _fsync_dir(run_dir)
    return archive


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
        raise ResumeMismatch(
            f"cannot resume from {path}: these settings changed since it was written, so the run would not "
            f"continue exactly: " + "; ".join(changed) + ". Restore them, use a new run_dir, or start "
            "this one over with --restart (restart=true)"
        )
