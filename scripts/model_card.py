"""The default model's card numbers: quality against baselines, sampler/steps and CFG sweeps, speed.

A study tool, not library code: imported by scripts/default_model_card.py, sample_grid.py and
downsampling_study.py (running a script puts this folder on `sys.path`).

Everything runs through the `latentforge eval` machinery (`runs.generate_and_evaluate`, `runs.sweep`,
`evaluate.compute_features`) with our CLIP's image features (FID-CLIP, KID, precision/recall) and text
tower (CLIP score), against the held-out real images of an emoji-layout dataset (DATA/{train,holdout}).
Baselines: (a) the same U-Net architecture untrained (random init; same VAE and text encoder), (b) a
nearest-neighbour "model" returning the training image whose caption embedding is closest to the prompt.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from latentforge.evaluation import runs
from latentforge.evaluation.evaluate import FeatureSet, compute_features
from latentforge.evaluation.extractors import EvalExtractor, load_extractor
from latentforge.evaluation.image_sets import EvalInputError, image_set
from latentforge.evaluation.report import COLUMNS, METRICS_FILE, _cell, plot_sweep, sweep_rows
from latentforge.model import StableDiffusion
from latentforge.models.unet import UNetModel
from latentforge.pipelines.request import GenerationRequest

CARD_METRICS = ("fid", "kid", "precision_recall", "clip_score")
PARTS = ("comparison", "steps", "cfg", "speed")
TABLE_COLUMNS = [c for c in COLUMNS if c[1] in ("fid", "kid", "precision", "recall", "clip_score")]
# The README grid: training captions first, then held-out ones (marked in the docs), in the caption format.
GRID_PROMPTS = (
    "red apple, food-fruit, google style",
    "red apple, food-fruit, twitter style",
    "grinning face, face-smiling, twitter style",
    "cat face, animal-mammal, google style",
    "rocket, transport-air, google style",
    "woman surfing, medium skin tone, person-sport, twitter style",
    "france flag, country-flag, google style",
    "birthday cake, food-sweet, google style",  # held out
    "octopus, animal-marine, twitter style",  # held out
)
GRID_SEEDS = (0, 1, 2, 3)
CAPTION_HEIGHT = 28  # two lines of Pillow's default font under each row
TITLE_HEIGHT = 16  # one line of it above each panel of a side-by-side comparison


@dataclass(frozen=True)
class CardSettings:
    """What the card measures; `quick()` is the smoke-test size."""

    images: int = 1000  # per (model, prompt set) of the comparison
    sweep_images: int = 500  # per point of the steps and CFG sweeps (held-out prompts)
    size: int = 64
    steps: int = 20
    sampler: str = "DPM++ 2M"
    cfg_scale: float = 7.0
    step_counts: tuple[int, ...] = (5, 10, 20, 50)
    samplers: tuple[str, ...] = ("DDIM", "Euler", "DPM++ 2M")
    cfg_scales: tuple[float, ...] = (1.0, 3.0, 5.0, 7.5, 10.0)
    speed_repeats: int = 10
    load_repeats: int = 3
    batch_size: int = 16
    seed: int = 0
    baselines: bool = True  # the comparison's untrained-U-Net and nearest-neighbour rows (not needed to
    # compare two versions of the model: `--no-baselines` halves the comparison's generation time)
    prompt_sets: tuple[str, ...] = ("train_prompts", "holdout_prompts")

    @classmethod
    def quick(cls, **overrides: Any) -> CardSettings:
        """A minutes-long run (tens of images): checks the whole pipeline, not the model."""
        small = dict(images=24, sweep_images=12, step_counts=(5, 10), cfg_scales=(1.0, 5.0), speed_repeats=3)
        return cls(**{**small, "load_repeats": 1, **overrides})

    def params(self, **changes: Any) -> GenerationRequest:
        base = GenerationRequest(
            steps=self.steps, sampler=self.sampler, cfg_scale=self.cfg_scale, width=self.size,
            height=self.size, batch_size=self.batch_size,
        )  # fmt: skip
        return replace(base, **changes)


# --------------------------------------------------------------------------------------------------
# Data, prompts and baselines
# --------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Image paths and captions of one dataset split (images without a caption are left out)."""

    paths: list[Path]
    captions: list[str]


def read_split(data_dir: str | os.PathLike, split: str) -> Split:
    """DATA/<split> of the emoji layout: every image with its same-stem .txt caption, in sorted order."""
    images = image_set(Path(data_dir) / split, split)
    captions = images.captions(range(len(images)))
    kept = [(p, c) for p, c in zip(images.paths, captions, strict=True) if c]
    if not kept:
        raise EvalInputError(f"no captioned images in {Path(data_dir) / split}")
    return Split([p for p, _ in kept], [c for _, c in kept])


def choose_prompts(captions: Sequence[str], images: int, seed: int) -> tuple[list[str], list[int]]:
    """(prompts, seeds) with len(prompts) * len(seeds) >= images: a seeded sample of the unique captions
    when there are enough, else all of them with ceil(images / count) seeds each."""
    unique = list(dict.fromkeys(captions))
    if len(unique) >= images:
        chosen = np.sort(np.random.default_rng(seed).choice(len(unique), images, replace=False))
        return [unique[i] for i in chosen], [seed]
    return unique, list(range(seed, seed + math.ceil(images / len(unique))))


class NearestCaptionBaseline:
    """For each prompt, the training image whose caption embedding (our CLIP text tower) is closest."""

    def __init__(
        self, train: Split, encode_text: Callable[[Sequence[str]], np.ndarray], batch_size: int = 256
    ) -> None:
        self.train, self.encode_text = train, encode_text
        self.embeddings = self._encode(train.captions, batch_size)  # [N, D], unit rows

    def _encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        rows = [self.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        out = np.concatenate(rows).astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def nearest(self, prompts: Sequence[str]) -> list[int]:
        """Index into the training split of each prompt's nearest caption (cosine similarity)."""
        return (self._encode(prompts) @ self.embeddings.T).argmax(axis=1).tolist()

    def images(self, prompts: Sequence[str], seeds: Sequence[int] = (0,)) -> list[Image.Image]:
        """One image per (prompt, seed), in `generate_images` order; seeds change nothing (deterministic)."""
        index = self.nearest(prompts)
        return [Image.open(self.train.paths[i]).convert("RGB") for i in index for _ in seeds]


def untrained_like(model: StableDiffusion, seed: int = 0) -> StableDiffusion:
    """The same family's U-Net freshly initialised (seeded), sharing `model`'s VAE and text encoder."""
    torch.manual_seed(seed)
    with torch.device(model.device):
        unet = UNetModel(model.family.unet)
    unet = unet.to(model.dtype).eval().requires_grad_(False)
    return replace(model, unet=unet, name=f"{model.name}-untrained", short_hash=None)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def compare(
    model: StableDiffusion,
    data_dir: str | os.PathLike,
    reference: FeatureSet,
    extractor: EvalExtractor,
    out_dir: str | os.PathLike,
    settings: CardSettings,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {prompt set: result}} for ours, the untrained U-Net and the nearest-neighbour baseline,
    with prompts from the training and the held-out captions, each against the held-out images."""
    train, holdout = read_split(data_dir, "train"), read_split(data_dir, "holdout")
    if settings.baselines and extractor.encode_text is None:
        raise EvalInputError(f"the nearest-neighbour baseline needs a CLIP text tower; got {extractor.spec}")
    methods = [("ours", model)]
    if settings.baselines:
        nearest = NearestCaptionBaseline(train, extractor.encode_text)  # type: ignore[arg-type]
        methods.append(("untrained", untrained_like(model, settings.seed)))
    options: dict[str, Any] = {
        "extractor": extractor,
        "metrics": CARD_METRICS,
        "batch_size": 50,
        "progress": progress,
    }
    results: dict[str, dict[str, dict[str, Any]]] = {method: {} for method, _ in methods}
    if settings.baselines:
        results["nearest_neighbour"] = {}
    sets = [
        (n, split)
        for n, split in (("train_prompts", train), ("holdout_prompts", holdout))
        if n in settings.prompt_sets
    ]
    for prompt_set, split in sets:
        prompts, seeds = choose_prompts(split.captions, settings.images, settings.seed)
        for method, bundle in methods:
            results[method][prompt_set] = runs.generate_and_evaluate(
                bundle, settings.params(), prompts, seeds, reference, Path(out_dir, method, prompt_set),
                overwrite=True, title=f"{method}, {prompt_set}", **options,
            )  # fmt: skip
        if not settings.baselines:
            continue
        captions = [p for p in prompts for _ in seeds]
        info = {"model": "nearest-neighbour", "prompts": len(prompts), "images": len(captions)}
        results["nearest_neighbour"][prompt_set] = runs.evaluate_to_dir(
            nearest.images(prompts, seeds), reference, Path(out_dir, "nearest_neighbour", prompt_set),
            captions=captions, title=f"nearest neighbour, {prompt_set}",
            extra={"generation": info},
            **options,
        )  # fmt: skip
    return results


def sweeps(
    model: StableDiffusion,
    data_dir: str | os.PathLike,
    extractor: EvalExtractor,
    out_dir: str | os.PathLike,
    settings: CardSettings,
    which: Sequence[str] = ("steps", "cfg"),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """{"steps": {sampler: rows}, "cfg": rows}: FID and CLIP score vs steps per sampler, and vs CFG scale
    (held-out prompts against the held-out images); each run's report sits under out_dir/steps|cfg."""
    prompts, seeds = choose_prompts(
        read_split(data_dir, "holdout").captions, settings.sweep_images, settings.seed
    )
    reference = Path(data_dir) / "holdout"
    options: dict[str, Any] = dict(
        extractor=extractor, metrics=CARD_METRICS, cache_dir=cache_dir, overwrite=True, progress=progress
    )
    out: dict[str, Any] = {}
    if "steps" in which:
        out["steps"] = {}
        for sampler in settings.samplers:
            where = Path(out_dir, "steps", sampler.replace(" ", "_"))
            params = settings.params(sampler=sampler)
            results = runs.sweep(
                model, params, "steps", settings.step_counts, prompts, seeds, reference, where, **options
            )
            out["steps"][sampler] = sweep_rows("steps", list(zip(settings.step_counts, results, strict=True)))
    if "cfg" in which:
        where = Path(out_dir, "cfg")
        results = runs.sweep(
            model, settings.params(), "cfg", settings.cfg_scales, prompts, seeds, reference, where, **options
        )
        out["cfg"] = sweep_rows("cfg", list(zip(settings.cfg_scales, results, strict=True)))
    return out


def measure_speed(
    model_path: str | os.PathLike,
    settings: CardSettings,
    prompt: str = GRID_PROMPTS[0],
    load: Callable[[str | os.PathLike], StableDiffusion] | None = None,
) -> dict[str, Any]:
    """Median seconds of model loading and of one end-to-end txt2img (prompt -> PIL image; batch 1), timed
    separately; generation is warmed up once first. `load` defaults to `latentforge.load`."""
    from latentforge.model import load as load_checkpoint
    from latentforge.pipelines.runner import run

    load_model = load or (lambda path: load_checkpoint(Path(path)))
    load_times, model = [], None
    for _ in range(max(settings.load_repeats, 1)):
        start = time.perf_counter()
        model = load_model(model_path)
        load_times.append(time.perf_counter() - start)
    assert model is not None
    params = settings.params(prompt=prompt, batch_size=1, seed=settings.seed)
    run(model, params, progress=False)  # warm-up: first-call allocations, lazy imports
    times = []
    for i in range(settings.speed_repeats):
        start = time.perf_counter()
        run(model, replace(params, seed=settings.seed + i), progress=False)
        times.append(time.perf_counter() - start)
    return {
        "generate_median_s": statistics.median(times),
        "generate_min_s": min(times),
        "generate_s": times,
        "load_median_s": statistics.median(load_times),
        "load_s": load_times,
        "setting": f"{settings.size}x{settings.size}, {settings.steps} steps {settings.sampler}, "
        f"CFG {settings.cfg_scale:g}, batch 1",
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "model_dtype": str(model.dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _row(values: dict[str, float]) -> list[str]:
    return [_cell(values, key, std, fmt) for _, key, std, fmt in TABLE_COLUMNS]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def comparison_table(comparison: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One row per (method, prompt set); metric cells as in `latentforge eval` reports."""
    names = {
        "ours": "ours",
        "untrained": "same U-Net, untrained",
        "nearest_neighbour": "nearest training image",
    }
    rows = []
    for method, sets in comparison.items():
        for prompt_set, result in sets.items():
            used = result["counts"]["generated"]["used"]
            rows.append(
                [names.get(method, method), prompt_set.replace("_", " "), *_row(result["values"]), used]
            )
    return _table(["Method", "Prompts", *(c[0] for c in TABLE_COLUMNS), "Images"], rows)


def steps_table(steps: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [
        [sampler, row["steps"], *_row(row), row["images"]]
        for sampler, items in steps.items()
        for row in items
    ]
    return _table(["Sampler", "Steps", *(c[0] for c in TABLE_COLUMNS), "Images"], rows)


def cfg_table(cfg: list[dict[str, Any]]) -> list[str]:
    return _table(
        ["CFG scale", *(c[0] for c in TABLE_COLUMNS), "Images"],
        [[r["cfg"], *_row(r), r["images"]] for r in cfg],
    )


def speed_table(speed: dict[str, Any]) -> list[str]:
    rows = [
        ["txt2img end to end (median)", f"{speed['generate_median_s']:.3f} s", speed["setting"]],
        ["txt2img end to end (best)", f"{speed['generate_min_s']:.3f} s", f"{len(speed['generate_s'])} runs"],
        ["model load (median)", f"{speed['load_median_s']:.3f} s", f"{len(speed['load_s'])} loads"],
    ]
    machine = f"{speed['cpu']}, {speed['cpu_count']} CPUs, {speed['torch_threads']} torch threads"
    return _table(["Measurement", "Seconds", "Notes"], rows) + [
        "",
        f"Machine: {machine}; torch {speed['torch']}.",
    ]


def plot_steps(steps: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """FID and CLIP score against the number of steps, one line per sampler."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for sampler, rows in steps.items():
        x = [row["steps"] for row in rows]
        for ax, key in zip(axes, ("fid", "clip_score"), strict=True):
            ax.plot(x, [row.get(key, math.nan) for row in rows], "o-", label=sampler)
    for ax, label in zip(axes, ("FID-CLIP (lower is better)", "CLIP score (higher is better)"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["steps"] for rows in steps.values() for r in rows}))
        ax.get_xaxis().set_major_formatter("{x:g}")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.legend()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


def write_card(card: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """metrics.json, one Markdown table per part (comparison.md, steps.md, cfg.md, speed.md), all of them
    in tables.md, and the plots steps.png and cfg.png; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / METRICS_FILE}
    paths["metrics"].write_text(json.dumps(card, indent=2, default=str) + "\n")
    sections = []
    makers: dict[str, tuple[str, Callable[[Any], list[str]]]] = {
        "comparison": ("Quality against baselines (held-out images as reference)", comparison_table),
        "steps": ("FID and CLIP score vs sampling steps", steps_table),
        "cfg": ("FID and CLIP score vs CFG scale", cfg_table),
        "speed": ("Speed", speed_table),
    }
    for part, (title, make) in makers.items():
        if part not in card:
            continue
        lines = make(card[part])
        if part == "steps":
            paths["steps_plot"] = plot_steps(card["steps"], out / "steps.png")
            lines += ["", "![FID and CLIP score vs steps](steps.png)"]
        if part == "cfg":
            paths["cfg_plot"] = plot_sweep("cfg", card["cfg"], out / "cfg.png")
            lines += ["", "![FID vs CFG scale and the FID / CLIP score trade-off](cfg.png)"]
        paths[part] = out / f"{part}.md"
        paths[part].write_text("\n".join(lines) + "\n")
        sections += [f"## {title}", "", *lines, ""]
    paths["tables"] = out / "tables.md"
    paths["tables"].write_text("\n".join(sections))
    return paths


@dataclass
class CardInputs:
    """What `model_card` measures: the model file, the CLIP for features, the dataset root."""

    model: str | os.PathLike
    clip: str | os.PathLike | EvalExtractor
    data: str | os.PathLike
    parts: tuple[str, ...] = PARTS
    extra: dict[str, Any] = field(default_factory=dict)


def model_card(
    inputs: CardInputs,
    out_dir: str | os.PathLike,
    settings: CardSettings | None = None,
    *,
    load: Callable[[str | os.PathLike], StableDiffusion] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen parts of the card (see `PARTS`) and write them with `write_card`; returns the card."""
    from latentforge.model import load as load_checkpoint

    settings = settings or CardSettings()
    unknown = sorted(set(inputs.parts) - set(PARTS))
    if unknown:
        raise EvalInputError(f"unknown card parts {unknown}; valid: {', '.join(PARTS)}")
    clip = inputs.clip if isinstance(inputs.clip, EvalExtractor) else f"clip:{os.fspath(inputs.clip)}"
    extractor = load_extractor(clip)
    out, cache_dir = Path(out_dir), Path(out_dir) / "feature-cache"
    card: dict[str, Any] = {
        "model": os.fspath(inputs.model),
        "features": extractor.spec,
        "data": os.fspath(inputs.data),
        "settings": asdict(settings),
        **inputs.extra,
    }
    model = load(inputs.model) if load else load_checkpoint(Path(inputs.model))
    card["model_name"], card["model_hash"] = model.name, model.short_hash
    if "comparison" in inputs.parts:
        reference = compute_features(
            Path(inputs.data) / "holdout",
            extractor,
            label="reference",
            cache_dir=cache_dir,
            progress=progress,
        )
        card["reference"] = reference.summary()
        card["comparison"] = compare(
            model, inputs.data, reference, extractor, out / "comparison", settings, progress
        )
    which = [part for part in ("steps", "cfg") if part in inputs.parts]
    if which:
        card |= sweeps(model, inputs.data, extractor, out, settings, which, cache_dir, progress)
    if "speed" in inputs.parts:
        card["speed"] = measure_speed(inputs.model, settings, load=load)
    write_card(_summary(card), out)
    return card


def _summary(card: dict[str, Any]) -> dict[str, Any]:
    """The card with each comparison result cut to its numbers, counts and generation (full ones are in
    the per-run metrics.json files)."""
    if "comparison" not in card:
        return card
    keep = ("values", "metrics", "counts", "generation")
    short = {
        m: {s: {k: r[k] for k in keep if k in r} for s, r in sets.items()}
        for m, sets in card["comparison"].items()
    }
    return {**card, "comparison": short}


# --------------------------------------------------------------------------------------------------
# Sample grid
# --------------------------------------------------------------------------------------------------


def caption_grid(
    rows: Sequence[Sequence[Image.Image]], captions: Sequence[str], cell: int = 96
) -> Image.Image:
    """Rows of images (cell x cell each) with each row's caption (wrapped, two lines at most) under it.

    Size: (columns * cell) x (rows * (cell + CAPTION_HEIGHT)).
    """
    if len(rows) != len(captions):
        raise ValueError(
            f"caption_grid needs one caption per row, got {len(rows)} rows, {len(captions)} captions"
        )
    columns = max((len(row) for row in rows), default=0)
    width, row_height = columns * cell, cell + CAPTION_HEIGHT
    grid = Image.new("RGB", (width, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, width // 6)  # Pillow's default bitmap font is about 6 px per character
    for r, (images, caption) in enumerate(zip(rows, captions, strict=True)):
        top = r * row_height
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS), (c * cell, top))
        lines = textwrap.wrap(caption, chars, max_lines=2, placeholder="...")
        draw.multiline_text((3, top + cell + 2), "\n".join(lines), fill="black", spacing=2)
    return grid


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str], gap: int = 16) -> Image.Image:
    """Panels (grids of the same prompts, one per model) left to right, each titled above, `gap` px apart.

    Size: (sum of widths + gaps) x (TITLE_HEIGHT + the tallest panel's height).
    """
    if len(panels) != len(titles):
        raise ValueError(
            f"side_by_side needs one title per panel, got {len(panels)} panels, {len(titles)} titles"
        )
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, TITLE_HEIGHT + max(panel.height for panel in panels)), "white")
    draw = ImageDraw.Draw(out)
    left = 0
    for panel, title in zip(panels, titles, strict=True):
        out.paste(panel, (left, TITLE_HEIGHT))
        draw.text((left + 3, 3), title, fill="black")
        left += panel.width + gap
    return out


def sample_rows(
    model: StableDiffusion, prompts: Sequence[str], seeds: Sequence[int], params: GenerationRequest
) -> list[list[Image.Image]]:
    """One row per prompt, one image per seed (each generated alone, so any seed list works)."""
    from latentforge.pipelines.runner import run

    return [
        [run(model, replace(params, prompt=p, seed=s, batch_size=1), progress=False)[0].image for s in seeds]
        for p in prompts
    ]
