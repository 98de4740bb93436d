"""The Python API in a few calls: `load`, then `txt2img` / `img2img` / `inpaint` returning PIL images,
`run` for a whole `GenerationRequest`, `from_png` to get the request an image was made with.

Each image carries its A1111 infotext in `image.info["parameters"]`, so `image.save(path, pnginfo=...)`
or `latentforge.pipelines.infotext.save_png` keeps it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import GeneratedImage
from latentforge.pipelines.infotext import PNG_KEY, read_infotext
from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, Inpaint
from latentforge.pipelines.request_infotext import from_infotext
from latentforge.pipelines.runner import iter_images

_FIELDS = {f.name for f in fields(GenerationRequest)}


def request_from_options(**options: Any) -> GenerationRequest:
    """A request from keyword options (`GenerationRequest` fields); unknown names list the known ones."""
    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise ParameterError(f"unknown parameters {unknown}; known: {', '.join(sorted(_FIELDS))}")
    return GenerationRequest(**options)


def images(results: Sequence[GeneratedImage]) -> list[Image.Image]:
    """PIL images with their infotext in `info["parameters"]`."""
    for result in results:
        result.image.info[PNG_KEY] = result.infotext
    return [result.image for result in results]


def run(model: StableDiffusion, request: GenerationRequest, **kwargs: Any) -> list[Image.Image]:
    """All images of a request (see `pipelines.runner.iter_images` for callback/progress)."""
    return images(list(iter_images(model, request, **kwargs)))


def txt2img(model: StableDiffusion, prompt: str | Sequence[str], **options: Any) -> list[Image.Image]:
    """Images for a prompt; options are `GenerationRequest` fields (steps, sampler, cfg_scale, seed ...).

    A list of prompts gives one image per prompt, image i with seed + i, `batch_size` images per batch.
    """
    if isinstance(prompt, str):
        return run(model, request_from_options(prompt=prompt, **options))
    seed = options.pop("seed", -1)
    if seed == -1:
        from latentforge.pipelines.seeds import resolve_seed

        seed = resolve_seed(seed)
    pairs = tuple((text, seed + i) for i, text in enumerate(prompt))
    return run(model, request_from_options(prompt_seeds=pairs, **options))


def img2img(
    model: StableDiffusion,
    image: Image.Image,
    prompt: str,
    *,
    denoising_strength: float = 0.75,
    **options: Any,
) -> list[Image.Image]:
    """Images that start from `image`, noised to `denoising_strength` and denoised."""
    init = InitImage((image,), denoising_strength)
    return run(model, request_from_options(prompt=prompt, init=init, **options))


def inpaint(
    model: StableDiffusion,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    *,
    denoising_strength: float = 0.75,
    mask_blur: float = 4,
    **options: Any,
) -> list[Image.Image]:
    """Repaint the white part of `mask` in `image` (A1111's inpaint tab; see `pipelines.inpaint`)."""
    init = InitImage((image,), denoising_strength)
    part = Inpaint(mask=mask, mask_blur=mask_blur)
    return run(model, request_from_options(prompt=prompt, init=init, inpaint=part, **options))


def hires(model: StableDiffusion, prompt: str, *, scale: float = 2.0, **options: Any) -> list[Image.Image]:
    """txt2img at the request's size, then A1111's hires-fix pass at `scale` times it."""
    return run(model, request_from_options(prompt=prompt, hires=Hires(scale=scale), **options))


def from_png(image: str | Path | Image.Image) -> GenerationRequest:
    """The request an image's infotext describes (PNG text chunk, or EXIF in JPEG/WebP).

    Keys no field holds are kept in `request.extra` and named in a warning; so are notes on what will
    differ (an infotext asking for GPU noise).
    """
    text = image.info.get(PNG_KEY) if isinstance(image, Image.Image) else read_infotext(image)
    if not isinstance(text, str) or not text.strip():
        name = "the image" if isinstance(image, Image.Image) else str(image)
        raise ParameterError(f"{name} has no generation parameters (no A1111 infotext)")
    parsed = from_infotext(text)
    for message in parsed.notes:
        warnings.warn(message, stacklevel=2)
    if parsed.unused:
        warnings.warn(f"infotext keys kept but not used: {', '.join(parsed.unused)}", stacklevel=2)
    return parsed.request


# ---- merging (docs/merging.md) ----

LoraArg = str | Path | tuple[str | Path, float] | tuple[str | Path, float, float | None]


def _lora_specs(loras: Sequence[LoraArg]) -> list[Any]:
    from latentforge.checkpoints.merge import LoraSpec

    specs = []
    for item in loras:
        path, *weights = (item,) if isinstance(item, str | Path) else item
        specs.append(LoraSpec(Path(path), *weights))
    return specs


def _dtype(dtype: Any) -> Any:
    import torch

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise ParameterError(f"dtype {dtype!r}: use one of {', '.join(names)}")
    return names[dtype]


def merge(
    out: str | Path,
    a: str | Path,
    b: str | Path | None = None,
    c: str | Path | None = None,
    *,
    alpha: float = 0.5,
    blocks: str | dict[str, float] | None = None,
    loras: Sequence[LoraArg] = (),
    dtype: Any = None,
    **options: Any,
) -> Any:
    """Merge checkpoints into `out`: A alone (+ `loras`), weighted sum of A, B, or add difference A, B, C.

    `blocks`: 26 comma-separated weights or a supermerger preset name (Merge Block Weighted); `loras`:
    paths or (path, strength[, text-encoder strength]); `dtype`: "fp16", "bf16", "fp32" or a torch dtype.
    Other options (`bake_vae`, `ema`, `discard`, `overwrite`) as `checkpoints.merge.merge_checkpoints`.
    Returns a `MergeResult` (`.path`, `.short_hash` = A1111's model hash, `.recipe`, `.notes`).
    """
    from latentforge.checkpoints.merge import Mode, merge_checkpoints
    from latentforge.checkpoints.merge_blocks import parse_block_weights

    if b is None and c is not None:
        raise ParameterError("merge: C (add difference) needs B")
    modes: dict[int, Mode] = {1: "none", 2: "weighted_sum", 3: "add_difference"}
    mode = modes[sum(p is not None for p in (a, b, c))]
    weights = parse_block_weights(blocks) if isinstance(blocks, str) else blocks
    return merge_checkpoints(
        out, a, b, c, mode=mode, alpha=alpha, block_weights=weights, dtype=_dtype(dtype),
        loras=_lora_specs(loras), **options,
    )  # fmt: skip


def merge_loras(
    out: str | Path,
    loras: Sequence[LoraArg],
    *,
    family: str | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype: Any = None,
    overwrite: bool = False,
) -> Any:
    """LoRA files at strengths into one kohya LoRA: ranks concatenated (exact) or SVD to `rank`.

    `family` ("sd1", "sd2", ...) when it cannot be told from the files. Returns a `LoraResult`
    (`.relative_error`: Frobenius error of the written factors, 0 for concatenation).
    """
    from latentforge.checkpoints.lora_merge import merge_loras as merge_lora_files
    from latentforge.models.families import get_family

    try:
        resolved = get_family(family) if family else None
    except KeyError as e:
        raise ParameterError(str(e.args[0])) from None
    return merge_lora_files(
        out,
        _lora_specs(loras),
        resolved,
        rank=rank,
        conv_rank=conv_rank,
        dtype=_dtype(dtype),
        overwrite=overwrite,
    )


def extract_lora(out: str | Path, original: str | Path, tuned: str | Path, **options: Any) -> Any:
    """The kohya LoRA taking `original` to `tuned` by SVD (`rank`, `conv_rank`, `clamp_quantile`, `min_diff`,
    `dtype`, `overwrite`); returns a `LoraResult` with the relative error of the written factors."""
    from latentforge.checkpoints.lora_merge import extract_lora as extract

    if "dtype" in options:
        options["dtype"] = _dtype(options["dtype"])
    return extract(out, original, tuned, **options)
