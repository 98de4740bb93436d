"""What the VAE and U-Net tasks share: option parsing, image datasets, a synthetic dataset, image grids."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset, Subset

from latentforge.data.image_folder import ImageFolderDataset
from latentforge.data.images import image_to_tensor
from latentforge.data.preflight import DatasetError, PreflightReport
from latentforge.errors import ConfigError
from latentforge.models.configs import TextEncoderConfig, UNetConfig, VAEConfig, config_from_dict
from latentforge.training.config import AT_LEAST_ONE, Range, check_ranges

OptionsT = TypeVar("OptionsT")
ExportDtype = Literal["float32", "float16", "bfloat16"]
_CONFIG_TYPES = (VAEConfig, UNetConfig, TextEncoderConfig)


def parse_options(cls: type[OptionsT], options: Mapping[str, Any], what: str) -> OptionsT:
    """Build an options dataclass from a TOML table, checking keys, types and ranges (`cls.RANGES`).

    Fields typed as a model config (VAEConfig ...) take a table of that config's fields. Every problem is
    a ConfigError that starts with the key (`task_options.x = ...`) and says what is valid.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"task_options.{unknown[0]}: unknown {what} task option{'s' if len(unknown) > 1 else ''} "
            f"{unknown}; valid options: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _typed(f"task_options.{name}", value, hints[name]) for name, value in options.items()}
    parsed = cls(**values)
    check_ranges(parsed, getattr(cls, "RANGES", {}), "task_options.")
    return parsed


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type wants it (ints accepted for floats, lists for tuples), else ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own error
            return _typed(key, value, options[0])
        errors = []
        for arg in options:
            try:
                return _typed(key, value, arg)
            except ConfigError as error:
                errors.append(str(error).split(": expected ", 1)[-1])
        raise ConfigError(f"{key} = {value!r}: expected {' or '.join(errors)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(repr, args))}")
    if hint in _CONFIG_TYPES:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} = {value!r}: expected a table of {hint.__name__} fields")
        try:
            config = config_from_dict(hint, dict(value))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{key}: {error}") from None
        check_ranges(config, _model_config_ranges(config), f"{key}.")
        problem = _attention_width_problem(config)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        return config
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        item = args[0] if args else Any
        typed = [_typed(key, v, item) for v in value]
        return tuple(typed) if origin is tuple else typed
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint in expected:
        raise ConfigError(f"{key} = {value!r}: expected {expected[hint]}")
    return value  # a type without a rule here (Any): the task checks it


def _model_config_ranges(config: Any) -> dict[str, Range]:
    """Architecture numbers are sizes and counts (>= 1), except indices and token ids (>= 0) and SDXL's
    fields where 0 means absent (no `label_emb`, no attention at a level)."""
    zero_ok = ("attention_levels", "pad_token", "level_depths", "adm_in_channels", "vector_embed_dim")
    return {f.name: Range() if f.name in zero_ok else AT_LEAST_ONE for f in dataclasses.fields(config)}


def _attention_width_problem(config: Any) -> str | None:
    """Attention heads must split the width evenly (the modules build either way and fail in forward)."""
    if isinstance(config, TextEncoderConfig) and config.width % config.heads:
        return f"heads = {config.heads} does not divide width = {config.width}"
    if isinstance(config, UNetConfig):
        if config.num_heads is None and config.head_dim is None:
            return "give num_heads or head_dim"
        for level in config.attention_levels:
            channels = config.model_channels * config.channel_mult[min(level, len(config.channel_mult) - 1)]
            heads, width = config.heads_at(channels)
            if heads * width != channels:
                return f"attention level {level} has {channels} channels, not divisible into {heads} heads"
    return None


ModelT = TypeVar("ModelT", bound=nn.Module)


def build_model(key: str, cls: Callable[[Any], ModelT], config: Any) -> ModelT:
    """`cls(config)`, with a config the module cannot be built from (channels not divisible by the norm
    groups, heads not dividing the width ...) reported as a ConfigError naming the task option."""
    try:
        return cls(config)
    except (ValueError, AssertionError, RuntimeError, ZeroDivisionError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"{key}: cannot build a {getattr(cls, '__name__', cls)} from {config}: {reason}"
        ) from None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageData:
    """Where images come from: "synthetic", or a folder with `train/` and `holdout/` (the emoji layout)."""

    data: str = "synthetic"
    train_data: str | None = None  # explicit folders override `data`
    holdout_data: str | None = None
    resolution: int = 32
    center_crop: bool = True
    flip: bool = False
    max_train_items: int | None = None  # first N items only (smoke runs)
    max_holdout_items: int | None = 64
    synthetic_items: int = 64  # train items of the synthetic set; holdout gets a quarter
    # Files that cannot be used (unreadable, no caption) stop the run, naming each, unless this is true:
    # then they are left out with a warning that lists them and their count.
    skip_unreadable: bool = False
    # Aspect-ratio buckets for the train split (data/buckets.py): each image keeps its aspect ratio at about
    # resolution**2 pixels, and a batch holds one bucket. Holdout images stay square.
    buckets: bool = False
    bucket_step: int | None = None  # default: 64 from resolution 256 on, else 8
    min_bucket_side: int | None = None  # default: resolution // 2
    max_bucket_side: int | None = None  # default: resolution * 2

    RANGES: ClassVar[dict[str, Range]] = {
        "resolution": AT_LEAST_ONE,
        "max_train_items": AT_LEAST_ONE,
        "max_holdout_items": AT_LEAST_ONE,
        "synthetic_items": AT_LEAST_ONE,
        "bucket_step": AT_LEAST_ONE,
        "min_bucket_side": AT_LEAST_ONE,
        "max_bucket_side": AT_LEAST_ONE,
    }


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


class SyntheticShapes(Dataset):
    """Coloured shapes on coloured backgrounds with captions ("a red circle on a blue background").

    Item i is a pure function of (seed, i), so the set needs no files; for tests and smoke runs.
    """

    def __init__(self, items: int, resolution: int, seed: int = 0) -> None:
        self.items, self.resolution, self.seed = items, resolution, seed

    def __len__(self) -> int:
        return self.items

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "SyntheticShapes",
            "items": self.items,
            "resolution": self.resolution,
            "seed": self.seed,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        names = list(COLOURS)
        background, colour = rng.choice(len(names), size=2, replace=False)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = self.resolution
        image = Image.new("RGB", (size, size), COLOURS[names[background]])
        draw = ImageDraw.Draw(image)
        radius = size * float(rng.uniform(0.2, 0.35))
        cx, cy = (size * float(rng.uniform(0.35, 0.65)) for _ in range(2))
        fill = COLOURS[names[colour]]
        if shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            points = [
                (cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in (-math.pi / 2, 0.52, 2.62)
            ]
            draw.polygon(points, fill=fill)
        caption = f"a {names[colour]} {shape} on a {names[background]} background"
        return {"pixels": image_to_tensor(image), "caption": caption}


class PixelsAndCaption(Dataset):
    """Keep only the collatable `pixels` and `caption` of another dataset's items (and, with buckets, the
    SDXL size conditioning `original_size` and `crop_top_left`, and `bucket_ids` for the loop's batching)."""

    def __init__(self, dataset: Dataset, sizes: bool = False) -> None:
        self.dataset, self.sizes = dataset, sizes
        if sizes:
            self.bucket_ids = list(dataset.bucket_ids)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def fingerprint(self) -> Any:
        from latentforge.training.latent_cache import dataset_fingerprint

        return dataset_fingerprint(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        kept = (
            ("pixels", "caption", "original_size", "crop_top_left") if self.sizes else ("pixels", "caption")
        )
        return {key: item[key] for key in kept}


def image_dataset(data: ImageData, split: str, seed: int = 0) -> Dataset:
    """Items {"pixels" [3, H, W] in [-1, 1], "caption" str} for "train" or "holdout"."""
    if split not in ("train", "holdout"):
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'holdout'")
    limit = data.max_train_items if split == "train" else data.max_holdout_items
    if data.data == "synthetic" and (data.train_data if split == "train" else data.holdout_data) is None:
        items = data.synthetic_items if split == "train" else max(1, data.synthetic_items // 4)
        dataset: Dataset = SyntheticShapes(
            items, data.resolution, seed=seed if split == "train" else seed + 1
        )
    else:
        explicit = data.train_data if split == "train" else data.holdout_data
        root = Path(explicit) if explicit is not None else Path(data.data) / split
        if not root.is_dir():
            raise DatasetError(
                root,
                f"{split} images folder not found; set `data` to a folder with train/ and holdout/ "
                f'subfolders, or `{split}_data` to the folder itself, or data = "synthetic"',
            )
        buckets = data.buckets and split == "train"
        folder = ImageFolderDataset(
            root,
            resolution=data.resolution,
            buckets=buckets,
            bucket_step=data.bucket_step,
            min_bucket_side=data.min_bucket_side,
            max_bucket_side=data.max_bucket_side,
            center_crop=data.center_crop if split == "train" else True,
            flip=data.flip if split == "train" else False,
            seed=seed,
            skip_unreadable=data.skip_unreadable,
        )
        _check_unusable(folder.report, data.skip_unreadable)
        dataset = PixelsAndCaption(folder, sizes=buckets)
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        bucket_ids = getattr(dataset, "bucket_ids", None)
        dataset = Subset(dataset, range(limit))
        if bucket_ids is not None:
            dataset.bucket_ids = bucket_ids[:limit]  # type: ignore[attr-defined]
    return dataset


def _check_unusable(report: PreflightReport, skip: bool, show: int = 10) -> None:
    """Name the files the dataset leaves out: an error (the default), or a warning with skip_unreadable."""
    unusable = report.unusable
    if not unusable:
        return
    listing = "; ".join(unusable[:show]) + (
        f"; ... and {len(unusable) - show} more" if len(unusable) > show else ""
    )
    if not skip:
        raise DatasetError(
            report.root,
            f"{len(unusable)} of its image files cannot be used ({listing}); fix or remove them, or set "
            "task_options.skip_unreadable = true to train without them",
        )
    warnings.warn(
        f"{report.root}: training without {len(unusable)} unusable image files "
        f"({len(report.entries)} used): {listing}",
        stacklevel=3,
    )


def first_items(dataset: Dataset, count: int) -> list[dict[str, Any]]:
    return [dataset[i] for i in range(min(count, len(dataset)))]  # type: ignore[arg-type]


def image_grid(rows: Sequence[torch.Tensor]) -> Image.Image:
    """Rows of image batches [N, 3, H, W] in [-1, 1] -> one PIL grid, one batch per row."""
    lines = [torch.cat(list(row.float().clamp(-1, 1)), dim=2) for row in rows]  # [3, H, N*W] each
    width = max(line.shape[2] for line in lines)
    lines = [torch.nn.functional.pad(line, (0, width - line.shape[2]), value=1.0) for line in lines]
    grid = torch.cat(lines, dim=1)  # [3, rows*H, N*W]
    array = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    try:
        return dtypes[name]
    except KeyError:
        raise ConfigError(
            f"task_options.export_dtype = {name!r}: valid values are {', '.join(dtypes)}"
        ) from None
