"""One config per run: a dataclass loaded from TOML, overridable from the command line.

A config file is flat TOML (`lr = 1e-4`, `betas = [0.9, 0.999]`) plus one free table,
`[task_options]`, that the task reads with its own dataclass. CLI overrides are `key=value` or
`task_options.sub.key=value`, where `value` is parsed as a TOML value (strings may be left unquoted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "auto")


@dataclass
class RunConfig:
    """Everything a run has in common; `task_options` is the task's own table."""

    run_dir: str = "runs/default"
    task: str = ""
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 32  # global: summed over processes and accumulation micro-steps
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01  # applied to weights with >= 2 dimensions only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.0  # 0 = off
    ema_start: int = 0  # EMA copies the weights until this step, then averages
    mixed_precision: str = "no"  # "auto": bf16 where the device multiplies bf16 natively, else fp32
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 3  # 0 = keep all
    eval_every: int = 0  # 0 = only at the end
    sample_every: int = 0  # 0 = only at the end
    log_every: int = 10
    num_workers: int = 0
    max_nan_steps: int = 5
    deterministic: bool = False
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda"
    tensorboard: bool = False  # also write TensorBoard events if `tensorboard` is installed
    task_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values."""
        checks = [
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0, "batch_size must be divisible by grad_accum"),
            (len(self.betas) == 2, "betas must be two numbers"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.max_nan_steps >= 1, "max_nan_steps must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "device must be 'auto', 'cpu' or 'cuda'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid config: {message}")

    def to_dict(self) -> dict[str, Any]:
        """Plain TOML-able types (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Fields that change the numbers a step computes: resuming with any of them changed is refused.
# Also compared (from the checkpoint, not the config): world_size * grad_accum and the dataset size.
# Free to change on resume: run_dir, checkpoint/eval/sample/log intervals, keep_checkpoints,
# num_workers, max_nan_steps, deterministic, device, tensorboard, gradient_checkpointing.
EXACTNESS_FIELDS = (
    "task",
    "seed",
    "max_steps",  # the cosine schedule is a function of max_steps
    "batch_size",
    "lr",
    "weight_decay",
    "betas",
    "warmup_steps",
    "lr_schedule",
    "min_lr",
    "grad_clip",
    "ema_decay",
    "ema_start",
    "mixed_precision",
    "task_options",
)


def exactness_dict(config: RunConfig) -> dict[str, Any]:
    """The config fields a resume must keep unchanged."""
    values = config.to_dict()
    return {name: values[name] for name in EXACTNESS_FIELDS}


def config_hash(config: RunConfig) -> str:
    """Short SHA-256 of `exactness_dict`."""
    blob = json.dumps(exactness_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # an unquoted string


def _set_dotted(table: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a table")
    table[leaf] = value


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check a TOML value against the field's default type (ints are accepted for floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"config key {name!r}: expected {type(default).__name__}, got {value!r}")
    return value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig; unknown keys are an error that lists the known ones."""
    defaults = RunConfig()
    known = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {', '.join(known)}")
    kwargs = {name: _coerce(name, value, getattr(defaults, name)) for name, value in values.items()}
    return RunConfig(**kwargs)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML config (or start from defaults when `path` is None) and apply `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r} is not of the form key=value (e.g. lr=3e-4)")
        _set_dotted(values, key.strip(), _parse_value(text.strip()))
    return config_from_dict(values)


# ---------------------------------------------------------------------------- TOML writer


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_table(table: dict[str, Any], prefix: str, lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
    for key, sub in tables.items():
        name = f"{prefix}{_toml_key(key)}"
        lines.extend(["", f"[{name}]"])
        _toml_table(sub, f"{name}.", lines)


def dumps_toml(table: dict[str, Any]) -> str:
    """A small TOML writer for plain types (str, int, float, bool, lists, nested tables)."""
    lines: list[str] = []
    _toml_table(table, "", lines)
    return "\n".join(lines) + "\n"


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML (loadable again with `load_config`)."""
    Path(path).write_text(dumps_toml(config.to_dict()), encoding="utf-8")


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """ "auto" -> "bf16" on devices with native bf16 matmuls (CUDA with bf16, CPUs with AVX512-BF16 or AMX),
    else "no": on CPUs without them bf16 autocast is emulated and runs ~3x slower than fp32 (measured,
    docs/training.md). "no" and "bf16" pass through."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up softly
        native = [getattr(torch.cpu, name, lambda: False)() for name in probes]
        return "bf16" if any(native) else "no"
    return "no"
