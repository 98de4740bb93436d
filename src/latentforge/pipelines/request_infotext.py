"""A `GenerationRequest` as A1111's infotext and back, through one table.

`INFOTEXT_KEYS` is the one table between request fields and A1111's infotext keys; `to_infotext` and
`from_infotext` both read it. Keys A1111 writes that no field holds (ADetailer, ...) are
kept in `extra`, written back as they were, and reported by `from_infotext`'s caller. A key is written
when its part exists and it is always written or differs from the field's default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from latentforge.errors import ParameterError
from latentforge.pipelines.controlnet import ControlNetUnit
from latentforge.pipelines.infotext import format_infotext, parse_infotext
from latentforge.pipelines.request import (
    GenerationRequest,
    Hires,
    InitImage,
    Inpaint,
    Refiner,
    SizeConditioning,
)
from latentforge.sampling.registry import SAMPLERS, OptionValue, split_sampler_name

VERSION = "latentforge"


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _pair(text: str) -> tuple[int, int]:
    first, _, second = text.partition(",")
    return int(first), int(second)


def _int(text: str) -> int:
    return int(float(text)) if "e" not in text.lower() else int(text)


@dataclass(frozen=True)
class InfotextKey:
    """One A1111 infotext key: the field it holds (`part.field` for the optional parts), how to read it,
    and when to write it (`always`, else only when it differs from the field's default)."""

    key: str
    field: str
    parse: Callable[[str], Any]
    always: bool = False
    format: Callable[[Any], str] = str


def _num(value: float) -> str:
    return f"{value:g}"


INFOTEXT_KEYS: tuple[InfotextKey, ...] = (
    InfotextKey("Steps", "steps", int, always=True),
    InfotextKey("Sampler", "sampler", str, always=True),
    InfotextKey("Schedule type", "schedule", str, always=True),
    InfotextKey("CFG scale", "cfg_scale", float, always=True, format=_num),
    InfotextKey("Seed", "seed", int, always=True),
    InfotextKey("Size", "size", _size, always=True, format=lambda s: f"{s[0]}x{s[1]}"),
    InfotextKey("Model hash", "model_hash", str),
    InfotextKey("Model", "model", str),
    InfotextKey("VAE hash", "vae_hash", str),
    InfotextKey("VAE", "vae", str),
    InfotextKey("Denoising strength", "denoising_strength", float, format=_num),
    InfotextKey("Clip skip", "clip_skip", int),
    InfotextKey("Variation seed", "subseed", int),
    InfotextKey("Variation seed strength", "subseed_strength", float, format=_num),
    InfotextKey("CFG rescale", "cfg_rescale", float, format=_num),
    InfotextKey("Eta", "eta", float, format=_num),
    InfotextKey("ENSD", "eta_noise_seed_delta", int),
    InfotextKey("Sigma churn", "sampler_options.s_churn", float, format=_num),
    InfotextKey("Sigma tmin", "sampler_options.s_tmin", float, format=_num),
    InfotextKey("Sigma tmax", "sampler_options.s_tmax", float, format=_num),
    InfotextKey("Sigma noise", "sampler_options.s_noise", float, format=_num),
    InfotextKey("Sampler order", "sampler_options.order", int),
    InfotextKey("Sampler variant", "sampler_options.variant", str),
    InfotextKey("Mask blur", "inpaint.mask_blur", float, always=True, format=_num),
    InfotextKey("Masked content", "inpaint.masked_content", str),
    InfotextKey(
        "Inpaint area",
        "inpaint.only_masked",
        lambda t: t == "Only masked",
        format=lambda v: "Only masked" if v else "Whole picture",
    ),
    InfotextKey("Masked area padding", "inpaint.only_masked_padding", int),
    InfotextKey("Latent blend", "inpaint.latent_blend", _bool),
    InfotextKey(
        "Outpaint",
        "inpaint.outpaint",
        lambda t: tuple(int(v) for v in t.split(",")),
        format=lambda m: ",".join(map(str, m)),
    ),
    InfotextKey("Hires upscale", "hires.scale", float, format=_num),
    InfotextKey("Hires resize", "hires.resize", _size, format=lambda s: f"{s[0]}x{s[1]}"),
    InfotextKey("Hires steps", "hires.steps", int),
    InfotextKey("Hires upscaler", "hires.upscaler", str, always=True),
    InfotextKey("Hires sampler", "hires.sampler", str),
    InfotextKey("Tiled VAE", "tiled_vae", _bool),
    InfotextKey("Lora hashes", "lora_hashes", str),
    InfotextKey("TI hashes", "ti_hashes", str),
    # SDXL: A1111's refiner keys; the size conditioning under our own names (A1111 keeps it in settings)
    InfotextKey("Refiner", "refiner.checkpoint", str, always=True),
    InfotextKey("Refiner switch at", "refiner.switch_at", float, always=True, format=_num),
    *(
        InfotextKey(f"SDXL {label}", f"size_cond.{name}", _size, format=lambda s: f"{s[0]}x{s[1]}")
        for label, name in (
            ("original size", "original_size"),
            ("target size", "target_size"),
            ("negative original size", "negative_original_size"),
            ("negative target size", "negative_target_size"),
        )
    ),
    *(
        InfotextKey(f"SDXL {label}", f"size_cond.{name}", _pair, format=lambda p: f"{p[0]},{p[1]}")
        for label, name in (
            ("crop top left", "crop_top_left"),
            ("negative crop top left", "negative_crop_top_left"),
        )
    ),
    InfotextKey("Aesthetic score", "size_cond.aesthetic_score", float, format=_num),
    InfotextKey("Negative aesthetic score", "size_cond.negative_aesthetic_score", float, format=_num),
    InfotextKey("NGMS", "s_min_uncond", float, format=_num),
    InfotextKey("NGMS all steps", "s_min_uncond_all", _bool),
    InfotextKey("CFG cutoff", "cfg_cutoff", float, format=_num),
    InfotextKey("Fast decode", "fast_decode", _bool),
    InfotextKey("Token merging ratio", "token_merging_ratio", float, format=_num),
    InfotextKey("Token merging max downsample", "token_merging_max_downsample", int),
    InfotextKey("Token merging random", "token_merging_random", _bool),
    InfotextKey("Token merging ratio hr", "hires.token_merging_ratio", float, format=_num),  # A1111's key
    InfotextKey("DeepCache interval", "deepcache_interval", int),  # no A1111 key: ours, written when on
    InfotextKey("DeepCache branch", "deepcache_branch", int),
)
# A ControlNet unit's value, `ControlNet N: "Module: canny, Model: name [hash], Weight: 1, ..."`: the inner
# keys of sd-webui-controlnet's `ControlNetUnit.infotext_fields()` (`field_to_displaytext`, in this order).
CONTROLNET_KEYS: tuple[InfotextKey, ...] = (
    InfotextKey("Module", "module", str, always=True),
    InfotextKey("Model", "model", str, always=True),
    InfotextKey("Weight", "weight", float, always=True, format=_num),
    InfotextKey("Resize Mode", "resize_mode", str, always=True),
    InfotextKey("Processor Res", "processor_res", _int, always=True),
    InfotextKey("Threshold A", "threshold_a", float, always=True, format=_num),
    InfotextKey("Threshold B", "threshold_b", float, always=True, format=_num),
    InfotextKey("Guidance Start", "guidance_start", float, always=True, format=_num),
    InfotextKey("Guidance End", "guidance_end", float, always=True, format=_num),
    InfotextKey("Pixel Perfect", "pixel_perfect", _bool, always=True),
    InfotextKey("Control Mode", "control_mode", str, always=True),
)
_CONTROLNET_KEY = re.compile(r"ControlNet (\d+)$")


def controlnet_to_infotext(unit: ControlNetUnit) -> str:
    return ", ".join(f"{e.key}: {e.format(getattr(unit, e.field))}" for e in CONTROLNET_KEYS)


def controlnet_from_infotext(key: str, text: str) -> ControlNetUnit | None:
    """The unit of a `ControlNet N` value in the extension's current format; None for the pre-1.1.4 format."""
    by_key = {e.key: e for e in CONTROLNET_KEYS}
    values: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition(": ")
        if not sep:
            return None
        entry = by_key.get(name)
        if entry is None:  # Low Vram, Hr Option, Save Detected Map ...: nothing of ours
            if name[:1].islower():  # "preprocessor: ..., starting/ending: (0, 1)": the old, unparsed format
                return None
            continue
        try:
            values[entry.field] = entry.parse(value)
        except ValueError:
            raise ParameterError(f"infotext key {key!r}: unreadable {name} {value!r}") from None
    return ControlNetUnit(**values)


# Keys A1111 writes with the same meaning as one above, read into that field.
INFOTEXT_ALIASES = {"Eta DDIM": "Eta", "Eta noise seed delta": "ENSD", "Schedule": "Schedule type"}
# Keys that describe how an image came out or which program wrote it, not what to generate.
OUTPUT_KEYS = ("Version", "RNG", "VAE decoded in fp32", "Tiled VAE decoded")
_PARTS = {
    "init": InitImage,
    "inpaint": Inpaint,
    "hires": Hires,
    "refiner": Refiner,
    "size_cond": SizeConditioning,
}


def _get(request: GenerationRequest, path: str) -> Any:
    if path == "size":
        return request.width, request.height
    if path == "denoising_strength":
        return request.denoising_strength if request.mode in ("img2img", "inpaint", "hires") else None
    head, _, tail = path.partition(".")
    if head == "sampler_options":
        return request.sampler_options.get(tail)
    value = getattr(request, head)
    if tail and value is not None:
        if tail == "resize":
            size = (value.resize_width, value.resize_height)
            return size if any(size) else None
        return getattr(value, tail)
    return None if tail else value


def _default(path: str) -> Any:
    head, _, tail = path.partition(".")
    if head in _PARTS:
        return {f.name: f.default for f in fields(_PARTS[head])}.get(tail)
    return {f.name: f.default for f in fields(GenerationRequest)}.get(head)


def to_infotext(request: GenerationRequest, outcome: Mapping[str, Any] | None = None) -> str:
    """A1111's infotext of a resolved single-image request; `outcome` adds facts of how the image came out."""
    values: dict[str, Any] = {}
    for entry in INFOTEXT_KEYS:
        value = _get(request, entry.field)
        if value is None or value == "":
            continue
        if (
            entry.key == "Hires upscale"
            and request.hires
            and (request.hires.resize_width or request.hires.resize_height)
        ):
            continue  # A1111 writes the scale or the resize target, not both
        if entry.always or entry.key == "Denoising strength" or value != _default(entry.field):
            values[entry.key] = entry.format(value)
    values.update({f"ControlNet {i}": controlnet_to_infotext(u) for i, u in enumerate(request.controlnet)})
    values.update(request.extra)
    values.update({k: v for k, v in (outcome or {}).items() if v is not None})
    values["RNG"] = "CPU"  # our noise: A1111 reproduces it with its CPU generator
    values["Version"] = VERSION
    return format_infotext(request.prompt, request.negative_prompt, values)


@dataclass(frozen=True)
class ParsedInfotext:
    request: GenerationRequest
    unused: tuple[str, ...]  # keys kept in `extra` because no field holds them
    notes: tuple[str, ...]  # what will differ from the original (GPU noise, ...)


def from_infotext(text: str) -> ParsedInfotext:
    """The request an infotext describes, with the keys it could not use and notes on what will differ."""
    if not text.strip():
        raise ParameterError("the infotext is empty: there are no generation parameters to read")
    prompt, negative, values = parse_infotext(text)
    values = {INFOTEXT_ALIASES.get(k, k): v for k, v in values.items()}
    by_key = {entry.key: entry for entry in INFOTEXT_KEYS}
    top: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    parts: dict[str, dict[str, Any]] = {}
    options: dict[str, OptionValue] = {}
    extra: dict[str, str] = {}
    units: dict[int, ControlNetUnit] = {}
    for key, text_value in values.items():
        entry = by_key.get(key)
        numbered = _CONTROLNET_KEY.match(key)
        unit = controlnet_from_infotext(key, text_value) if numbered else None
        if numbered and unit is not None:
            units[int(numbered.group(1))] = unit
            continue
        if entry is None:
            if key not in OUTPUT_KEYS:
                extra[key] = text_value
            continue
        try:
            value = entry.parse(text_value)
        except (ValueError, TypeError):
            raise ParameterError(f"infotext key {key!r} has an unreadable value {text_value!r}") from None
        head, _, tail = entry.field.partition(".")
        if entry.field == "size":
            top["width"], top["height"] = value
        elif head == "sampler_options":
            options[tail] = value
        elif entry.field == "denoising_strength":
            top["denoising_strength"] = value
        elif tail == "resize":
            parts.setdefault("hires", {}).update(resize_width=value[0], resize_height=value[1])
        elif tail:
            parts.setdefault(head, {})[tail] = value
        else:
            top[head] = value
    strength = top.pop("denoising_strength", None)
    if "hires" in parts:
        if strength is not None:
            parts["hires"]["denoising_strength"] = strength
    elif "inpaint" in parts or strength is not None:
        parts["init"] = {} if strength is None else {"denoising_strength": strength}
    if "sampler" in top:
        top["sampler"], top["schedule"] = _sampler_and_schedule(top["sampler"], values)
    built = {name: _PARTS[name](**values) for name, values in parts.items()}
    controlnet = tuple(units[i] for i in sorted(units))
    request = GenerationRequest(**top, **built, controlnet=controlnet, sampler_options=options, extra=extra)
    return ParsedInfotext(request, tuple(extra), tuple(_notes(values)))


# Before A1111 1.9 a sampler name without a schedule suffix ran the model's own sigmas ("Uniform"),
# except Restart (Karras) and the timestep samplers (their own spacing, our "Automatic").
_BEFORE_SCHEDULE_TYPE = {"Restart": "Karras", "DDIM": "Automatic", "PLMS": "Automatic", "UniPC": "Automatic"}


def _sampler_and_schedule(name: str, values: Mapping[str, str]) -> tuple[str, str]:
    """The sampler and the schedule the image was made with (A1111's combined names split off)."""
    schedule = values.get("Schedule type", "Automatic")
    sampler, schedule = split_sampler_name(name, schedule)
    if "Schedule type" not in values and name in SAMPLERS and not _ours(values):
        schedule = _BEFORE_SCHEDULE_TYPE.get(sampler, "Uniform")
    return sampler, schedule


def _ours(values: Mapping[str, str]) -> bool:
    return values.get("Version", "").startswith(VERSION)


def _notes(values: Mapping[str, str]) -> list[str]:
    notes = []
    rng = values.get("RNG", "CPU" if _ours(values) else "GPU")
    if rng != "CPU":
        notes.append(
            f"the image was made with {rng} noise (A1111's default); latentforge draws noise with the CPU "
            "generator (A1111's RNG: CPU), so the image will differ"
        )
    return notes
