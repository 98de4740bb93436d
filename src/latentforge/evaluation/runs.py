"""Evaluation runs: generate from a spec (prompts x seeds), evaluate against a reference, write the report.

Every prompt is generated with every seed, batches mixing prompts (one `torch.Generator` per image, so
batching does not change images). Each image is saved as a PNG with its
infotext and a same-stem `.txt` holding its prompt, which CLIP score reads back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from latentforge.errors import OutputError
from latentforge.evaluation.evaluate import FeatureSet, compute_features, evaluate
from latentforge.evaluation.extractors import EvalExtractor, load_extractor
from latentforge.evaluation.image_sets import EvalInputError, ImageSource, image_set
from latentforge.evaluation.report import run_dir_name, write_report, write_sweep_report
from latentforge.model import StableDiffusion
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.sharding import Shard, on_main

# --sweep KEY: (GenerationRequest field, value parser)
SWEEP_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "steps": ("steps", int),
    "cfg": ("cfg_scale", float),
    "sampler": ("sampler", str),
}
IMAGES_DIR = "images"


def parse_seeds(text: str) -> list[int]:
    """Seeds from "0-99", "7" or "0-9,100,200-209" (ranges inclusive, order kept)."""
    seeds: list[int] = []
    for part in text.split(","):
        start, dash, end = part.strip().partition("-")
        try:
            first, last = int(start), int(end) if dash else int(start)
        except ValueError:
            raise EvalInputError(f"seeds must look like 0-99 or 1,5,9-12, got {text!r}") from None
        if first < 0 or last < first:
            raise EvalInputError(f"seed range {part.strip()!r} must be ascending and non-negative")
        seeds += range(first, last + 1)
    return seeds


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """("cfg", [1.0, 3.0]) from "cfg=1,3"; keys are those of `SWEEP_KEYS`."""
    key, _, values = text.partition("=")
    key = key.strip()
    if key not in SWEEP_KEYS or not values.strip():
        raise EvalInputError(
            f"--sweep must look like KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}; got {text!r}"
        )
    kind = SWEEP_KEYS[key][1]
    try:
        return key, [kind(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError:
        raise EvalInputError(f"--sweep {key} takes {kind.__name__} values, got {values!r}") from None


def read_prompts(source: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line; blank lines and # comments skipped) or from the captions
    (same-stem .txt files) of a dataset folder such as DATASET/holdout."""
    path = Path(source)
    if path.is_dir():
        images = image_set(path, "prompts")
        prompts = [c for c in images.captions(range(len(images))) if c]
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise EvalInputError(f"{path}: cannot read the prompts file ({e})") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise EvalInputError(f"no prompts in {path}")
    return prompts


def generate_images(
    model: StableDiffusion,
    request: GenerationRequest,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
) -> list[Path]:
    """Generate every prompt with every seed into `out_dir` as `NNNNN-SEED.png` (infotext) + `.txt` (prompt).

    A folder that already holds images is refused unless `overwrite`, which deletes its PNGs and captions.
    With a `shard` (torchrun) this process makes its part; every rank returns all paths once all are written.
    """
    from latentforge import distributed
    from latentforge.pipelines.infotext import save_png
    from latentforge.pipelines.runner import iter_images

    shard = shard or Shard()
    out = Path(out_dir)
    on_main(lambda: _clear_images(out, overwrite))
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    mine = shard.images(len(pairs), request.batch_size)
    with tqdm(total=len(mine), desc="generating", unit="img", disable=not progress) as bar:
        request = replace(request, prompt_seeds=tuple(pairs))
        for result in iter_images(model, request, progress=False, shard=shard):
            path = out / f"{result.index:05d}-{result.seed}.png"
            save_png(result.image, path, result.infotext)
            path.with_suffix(".txt").write_text(pairs[result.index][0] + "\n", encoding="utf-8")
            bar.update(1)
    distributed.barrier()  # every rank's images are written
    return [out / f"{i:05d}-{seed}.png" for i, (_, seed) in enumerate(pairs)]


def _clear_images(out: Path, overwrite: bool) -> None:
    existing = sorted(out.glob("*.png")) if out.is_dir() else []
    if existing and not overwrite:
        raise OutputError(
            f"{out} already holds {len(existing)} images; evaluate them with --generated {out}, choose "
            "another --out, or pass --overwrite to replace them"
        )
    for path in existing:
        path.unlink()
        path.with_suffix(".txt").unlink(missing_ok=True)


def evaluate_to_dir(
    generated: ImageSource,
    reference: ImageSource | FeatureSet,
    out_dir: str | os.PathLike,
    *,
    extractor: EvalExtractor,
    extra: dict[str, Any] | None = None,
    title: str = "Evaluation",
    **options: Any,
) -> dict[str, Any]:
    """`evaluate` plus `write_report` into `out_dir`; `extra` is merged into the result (e.g. generation)."""
    if isinstance(generated, (str, os.PathLike)):
        out, folder = Path(out_dir).resolve(), Path(generated).resolve()
        if out == folder or folder in out.parents:
            raise EvalInputError(
                f"--out {out_dir} lies inside the evaluated folder {generated}; choose another --out"
            )
    result, gen, ref = evaluate(generated, reference, extractor=extractor, **options)
    result.update(extra or {})
    write_report(result, out_dir, samples=(gen.samples, ref.samples), title=title)
    return result


def _generation_info(
    model: StableDiffusion, request: GenerationRequest, prompts: Sequence[str], seeds: Sequence[int]
) -> dict[str, Any]:
    fields = asdict(request)
    for name in ("prompt", "seed", "batch_size", "batch_count", "extra", "prompt_seeds", "init", "inpaint"):
        fields.pop(name)
    seed_text = (
        f"{seeds[0]}-{seeds[-1]}" if list(seeds) == list(range(seeds[0], seeds[-1] + 1)) else str(list(seeds))
    )
    return {
        "model": model.name,
        "model_hash": model.short_hash,
        "prompts": len(prompts),
        "seeds": seed_text,
        "images": len(prompts) * len(seeds),
        "params": fields,
    }


def generate_and_evaluate(
    model: StableDiffusion,
    request: GenerationRequest,
    prompts: Sequence[str],
    seeds: Sequence[int],
    reference: ImageSource | FeatureSet,
    out_dir: str | os.PathLike,
    *,
    extractor: EvalExtractor,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    **options: Any,
) -> dict[str, Any] | None:
    """Generate into `out_dir/images`, evaluate against `reference`, write the report into `out_dir`.

    With a `shard` (torchrun) every rank generates its part and rank 0 alone evaluates the full set (the
    others return None), so `out_dir` must be a folder all ranks share.
    """
    shard = shard or Shard()
    images = generate_images(
        model, request, prompts, seeds, Path(out_dir) / IMAGES_DIR, overwrite=overwrite, progress=progress,
        shard=shard,
    )  # fmt: skip
    if not shard.is_main:
        return None
    missing = [path.name for path in images if not path.is_file()]
    if missing:
        raise OutputError(
            f"{images[0].parent} lacks {len(missing)} of the {len(images)} generated images (first "
            f"{missing[0]}): under torchrun on several machines --out must be a folder they all share"
        )
    return evaluate_to_dir(
        images[0].parent, reference, out_dir, extractor=extractor, progress=progress,
        extra={"generation": _generation_info(model, request, prompts, seeds)}, **options,
    )  # fmt: skip


def sweep(
    model: StableDiffusion,
    request: GenerationRequest,
    key: str,
    values: Sequence[Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    reference: ImageSource,
    out_dir: str | os.PathLike,
    *,
    extractor: str | EvalExtractor,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 50,
    overwrite: bool = False,
    progress: bool = True,
    shard: Shard | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Generate and evaluate once per value of `key` (a `SWEEP_KEYS` name) into `out_dir/KEY=VALUE/`, then
    write the sweep table and plot into `out_dir`. Reference features are computed once. With a `shard`,
    rank 0 alone evaluates and writes (the others return [])."""
    if key not in SWEEP_KEYS:
        raise EvalInputError(f"cannot sweep {key!r}; valid: {', '.join(SWEEP_KEYS)}")
    shard = shard or Shard()
    extractor = load_extractor(extractor)
    ref: ImageSource | FeatureSet = reference
    if shard.is_main:
        ref = compute_features(
            reference, extractor, label="reference", cache_dir=cache_dir, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
    field_name = SWEEP_KEYS[key][0]
    runs = []
    for value in values:
        run_dir = Path(out_dir) / run_dir_name(key, value)
        result = generate_and_evaluate(
            model, replace(request, **{field_name: value}), prompts, seeds, ref, run_dir, extractor=extractor,
            overwrite=overwrite, progress=progress, batch_size=batch_size, shard=shard, **options,
        )  # fmt: skip
        if result is not None:
            runs.append((value, result))
    if not shard.is_main:
        return []
    write_sweep_report(key, runs, out_dir)
    return [result for _, result in runs]
