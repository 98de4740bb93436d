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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentforge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "auto")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field: finite, between `low` and `high` (open or closed)."""

    low: float | None = 0.0
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what a special value means, e.g. "0 = off"

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        text = "a finite number " + " and ".join(part for part in (low, high) if part)
        return f"{text} ({self.note})" if self.note else text


NON_NEGATIVE = Range()  # the rule for every numeric field that names no other
POSITIVE = Range(low_open=True)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0.0, 1.0)  # probabilities
DECAY = Range(0.0, 1.0, high_open=True)


def check_ranges(values: Any, ranges: Mapping[str, Range], prefix: str = "") -> None:
    """ConfigError for the first numeric field of dataclass `values` outside its range (NON_NEGATIVE unless
    `ranges` names it); None means "default/off" and is not checked; tuples are checked element-wise."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        items = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in items if isinstance(v, int | float) and not isinstance(v, bool)]
        valid = ranges.get(f.name, NON_NEGATIVE)
        if any(v not in valid for v in numbers):
            raise ConfigError(f"{prefix}{f.name} = {_toml_value(value)} is out of range: valid is {valid}")


RUN_RANGES = {
    "batch_size": AT_LEAST_ONE,
    "grad_accum": AT_LEAST_ONE,
    "lr": POSITIVE,
    "betas": DECAY,
    "grad_clip": Range(note="0 = off"),
    "ema_decay": Range(0.0, 1.0, high_open=True, note="0 = off"),
    "checkpoint_every": Range(note="0 = only at the end"),
    "keep_checkpoints": Range(note="0 = keep all"),
    "eval_every": Range(note="0 = only at the end"),
    "sample_every": Range(note="0 = only at the end"),
    "log_every": AT_LEAST_ONE,
    "max_nan_steps": AT_LEAST_ONE,
    "seed": Range(0, 2**63 - 1),
}


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
    compile: bool = False  # torch.compile the training forward (inductor): minutes to compile, then faster
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
    restart: bool = False  # start over although checkpoints exist (they are moved to before-restart-N/)
    task_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the key, its value and the valid range (checked before anything is built)."""
        choices = (("lr_schedule", LR_SCHEDULES), ("mixed_precision", MIXED_PRECISION), ("device", DEVICES))
        for name, valid in choices:
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: valid values are {', '.join(valid)}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas = {_toml_value(self.betas)}: give two numbers, e.g. [0.9, 0.999]")
        check_ranges(self, RUN_RANGES)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size = {self.batch_size} is not divisible by grad_accum = {self.grad_accum}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"min_lr = {self.min_lr:g} is above lr = {self.lr:g}: valid is 0 <= min_lr <= lr"
            )
        if not self.run_dir:
            raise ConfigError('run_dir is empty: give a folder, e.g. run_dir = "runs/first"')

    def to_dict(self) -> dict[str, Any]:
        """Plain TOML-able types (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Fields that change the numbers a step computes: resuming with any of them changed is refused.
# Also compared (from the checkpoint, not the config): world_size * grad_accum and the dataset size.
# Free to change on resume: run_dir, checkpoint/eval/sample/log intervals, keep_checkpoints,
# num_workers, max_nan_steps, deterministic, device, tensorboard, gradient_checkpointing, restart.
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
            raise ConfigError(f"override {key!r}: {part!r} is not a table")
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
        expected = {
            "bool": "true or false",
            "int": "an integer",
            "float": "a number",
            "tuple": "a list of numbers",
        }
        kind = type(default).__name__
        raise ConfigError(f"{name} = {value!r}: expected {expected.get(kind, 'a ' + kind)}")
    return value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig; unknown keys are an error that lists the known ones."""
    defaults = RunConfig()
    known = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {', '.join(known)}")
    kwargs = {name: _coerce(name, value, getattr(defaults, name)) for name, value in values.items()}
    return RunConfig(**kwargs)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML config (or start from defaults when `path` is None) and apply `key=value` overrides.

    Every problem is a ConfigError naming the file (or the override) and the key.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as error:
            raise ConfigError(f"cannot read the config file: {error.strerror or error}", str(path)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"not valid TOML: {error}", str(path)) from None
    overridden: set[str] = set()
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key=value (e.g. lr=3e-4)")
        _set_dotted(values, key.strip(), _parse_value(text.strip()))
        overridden.add(key.strip())
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(str(error), config_source(path, overridden, str(error))) from None


def config_source(path: str | os.PathLike | None, overridden: set[str], message: str) -> str | None:
    """What a ConfigError should name: "command-line override" when its message starts with an overridden
    key (`lr = ...`, `task_options.x = ...`), else the config file."""
    key = message.split(" ", 1)[0]
    if any(key == name or key.startswith(name + ".") for name in overridden):
        return "command-line override"
    return None if path is None else str(path)


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
