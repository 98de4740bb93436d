"""A1111's `/sdapi/v1/txt2img` and `/img2img` payloads -> `GenerationRequest`, through one table.

`PAYLOAD_FIELDS` names every field of A1111's request models (modules/api/models.py, built from
`StableDiffusionProcessingTxt2Img/Img2Img` in modules/processing.py) with A1111's default and the request
field it fills; a field with no target is accepted and, when it differs from A1111's default, reported
in the response's `warnings` instead of being dropped silently. Bad values raise `ParameterError`
naming the field (HTTP 422).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image, ImageOps

from latentforge.errors import ParameterError
from latentforge.pipelines.controlnet import CONTROL_MODES, RESIZE_MODES, ControlNetUnit, canonical
from latentforge.pipelines.preprocessors import get_preprocessor
from latentforge.pipelines.request import MASKED_CONTENT, GenerationRequest, Hires, InitImage, Inpaint
from latentforge.sampling.registry import get_sampler, split_sampler_name

MAX_IMAGE_BYTES = 64 * 1024 * 1024  # one decoded base64 image


@dataclass(frozen=True)
class Limits:
    """What one HTTP request may ask for, checked before it is queued (422), below the library's own
    limits (pipelines/request.py) so that one client cannot hold the server for hours. The defaults are
    A1111's UI slider ends (steps 150, batch size 8, batch count 100, 2048 px per side)."""

    max_pixels: int = 2048 * 2048  # width x height, also after hires
    max_steps: int = 150
    max_batch_size: int = 8
    max_images: int = 100  # batch_size x n_iter
    max_prompt_chars: int = 10_000


def check_limits(request: GenerationRequest, limits: Limits) -> None:
    """Refuse a request beyond the server's limits, naming the A1111 field."""
    r = request
    checks = [
        ("steps", r.steps, limits.max_steps),
        ("batch_size", r.batch_size, limits.max_batch_size),
        ("batch_size x n_iter", r.batch_size * r.batch_count, limits.max_images),
        ("prompt length", len(r.prompt), limits.max_prompt_chars),
        ("negative_prompt length", len(r.negative_prompt), limits.max_prompt_chars),
        ("width x height", r.width * r.height, limits.max_pixels),
    ]
    if r.hires is not None:
        scale = r.hires.scale if not (r.hires.resize_width or r.hires.resize_height) else 1.0
        pixels = max(r.hires.resize_width, r.width * scale) * max(r.hires.resize_height, r.height * scale)
        checks += [
            ("hires size", int(pixels), limits.max_pixels),
            ("hr_second_pass_steps", r.hires.steps, limits.max_steps),
        ]
    for name, value, limit in checks:
        if value > limit:
            raise ParameterError(f"{name} {value} exceeds this server's limit of {limit}")


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ParameterError(f"{key} must be a whole number, got {value!r}")
    return int(value)


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ParameterError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ParameterError(f"{key} must be a string, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if value not in (True, False, 0, 1):
        raise ParameterError(f"{key} must be true or false, got {value!r}")
    return bool(value)


def decode_image(key: str, value: Any) -> Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL, as A1111 accepts): PNG, JPEG or WebP only.

    Never a URL to fetch; Pillow's decompression-bomb limit stays on (an error, not a warning).
    """
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{key} must be a base64-encoded image, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ParameterError(f"{key}: the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError(
            f"{key} is not valid base64 (send the image file's bytes base64-encoded)"
        ) from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        limit = Image.MAX_IMAGE_PIXELS or 0
        if limit and image.width * image.height > limit:  # Pillow only warns below twice its limit
            raise ParameterError(
                f"{key}: {image.width}x{image.height} exceeds {limit} pixels (a decompression bomb?)"
            )
        image.load()
    except Image.DecompressionBombError as error:
        raise ParameterError(f"{key}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ParameterError(f"{key} is not a readable {'/'.join(IMAGE_FORMATS)} image ({error})") from None
    return image


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """A PNG with the infotext in its `parameters` chunk, base64-encoded (A1111: `encode_pil_to_base64`)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class PayloadField:
    """One A1111 payload field: its default there, the request field it fills ("" = accepted, unused),
    how its value is read, and the routes that have it."""

    key: str
    default: Any
    target: str = ""
    read: Callable[[str, Any], Any] | None = None
    modes: tuple[str, ...] = ("txt2img", "img2img")


def _schedule(key: str, value: Any) -> str:
    text = _str(key, value)
    return "Automatic" if text.lower() == "automatic" else text  # A1111 1.9+ sends names: "karras"


def _fill(key: str, value: Any) -> str:
    index = _int(key, value)
    if not 0 <= index < len(MASKED_CONTENT):
        raise ParameterError(f"{key} must be 0-3 ({', '.join(MASKED_CONTENT)}), got {value!r}")
    return MASKED_CONTENT[index]


def _resize_mode(key: str, value: Any) -> int:
    mode = _int(key, value)
    if mode != 0:  # A1111: 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
        raise ParameterError(f"{key} {mode} is not supported yet; only 0 (just resize)")
    return mode


def _images(key: str, value: Any) -> tuple[Image.Image, ...]:
    if not isinstance(value, list) or not value:
        raise ParameterError(f"{key} must be a non-empty list of base64 images")
    return tuple(decode_image(f"{key}[{i}]", v) for i, v in enumerate(value))


_I, _F, _S, _B = _int, _float, _str, _bool
_IMG = ("img2img",)
_TXT = ("txt2img",)

# A1111's field, its default (processing.py / api/models.py), our field ("part.field" for the parts).
PAYLOAD_FIELDS: tuple[PayloadField, ...] = (
    PayloadField("prompt", "", "prompt", _S),
    PayloadField("negative_prompt", "", "negative_prompt", _S),
    PayloadField("steps", 50, "steps", _I),
    PayloadField("sampler_name", None, "sampler", _S),
    PayloadField("sampler_index", "Euler", "sampler", _S),  # the older name; sampler_name wins
    PayloadField("scheduler", None, "schedule", _schedule),
    PayloadField("cfg_scale", 7.0, "cfg_scale", _F),
    PayloadField("seed", -1, "seed", _I),
    PayloadField("subseed", -1, "subseed", _I),
    PayloadField("subseed_strength", 0.0, "subseed_strength", _F),
    # A1111: 512; here 0 = the model family's default size (512 for SD 1.x), the init image's for img2img
    PayloadField("width", 0, "width", _I),
    PayloadField("height", 0, "height", _I),
    PayloadField("batch_size", 1, "batch_size", _I),
    PayloadField("n_iter", 1, "batch_count", _I),
    PayloadField("eta", None, "sampler_options.eta", _F),
    PayloadField("s_churn", 0.0, "sampler_options.s_churn", _F),
    PayloadField("s_tmin", 0.0, "sampler_options.s_tmin", _F),
    PayloadField("s_tmax", 0.0, "sampler_options.s_tmax", _F),  # 0: infinity, as A1111
    PayloadField("s_noise", 1.0, "sampler_options.s_noise", _F),
    PayloadField("s_min_uncond", 0.0, "s_min_uncond", _F),  # A1111's NGMS (docs/performance.md)
    # Speed options A1111 has no field for (ours, docs/performance.md); token merging's ratio and NGMS all
    # steps are A1111 options, so they come in override_settings (OVERRIDE_SETTINGS below).
    PayloadField("cfg_cutoff", 1.0, "cfg_cutoff", _F),
    PayloadField("deepcache_interval", 0, "deepcache_interval", _I),
    PayloadField("deepcache_branch", 0, "deepcache_branch", _I),
    PayloadField("token_merging_max_downsample", 1, "token_merging_max_downsample", _I),
    PayloadField("token_merging_random", False, "token_merging_random", _B),
    PayloadField("fast_decode", False, "fast_decode", _B),
    PayloadField("denoising_strength", None, "init.denoising_strength", _F, _IMG),
    PayloadField("denoising_strength", None, "hires.denoising_strength", _F, _TXT),
    PayloadField("enable_hr", False, "enable_hr", _B, _TXT),
    PayloadField("hr_scale", 2.0, "hires.scale", _F, _TXT),
    PayloadField("hr_upscaler", None, "hires.upscaler", _S, _TXT),
    PayloadField("hr_second_pass_steps", 0, "hires.steps", _I, _TXT),
    PayloadField("hr_resize_x", 0, "hires.resize_width", _I, _TXT),
    PayloadField("hr_resize_y", 0, "hires.resize_height", _I, _TXT),
    PayloadField("hr_sampler_name", None, "hires.sampler", _S, _TXT),
    PayloadField("init_images", None, "init.images", _images, _IMG),
    PayloadField("resize_mode", 0, "resize_mode", _resize_mode, _IMG),
    PayloadField("mask", None, "inpaint.mask", decode_image, _IMG),
    PayloadField("mask_blur", 4, "inpaint.mask_blur", _F, _IMG),
    PayloadField("inpainting_fill", 0, "inpaint.masked_content", _fill, _IMG),
    PayloadField("inpaint_full_res", True, "inpaint.only_masked", _B, _IMG),
    PayloadField("inpaint_full_res_padding", 0, "inpaint.only_masked_padding", _I, _IMG),
    PayloadField("inpainting_mask_invert", 0, "mask_invert", _I, _IMG),
    PayloadField("override_settings", {}, "override_settings"),
    PayloadField("send_images", True, "send_images", _B),
    PayloadField("alwayson_scripts", {}, "alwayson_scripts"),
    PayloadField(
        "force_task_id", None, "task_id", _S
    ),  # the id `POST /internal/progress` polls  # ControlNet units; other scripts reported
    # Accepted, not used (yet): reported in `warnings` when they differ from A1111's default.
    *(
        PayloadField(key, default)
        for key, default in (
            ("styles", []),
            ("seed_resize_from_h", -1),
            ("seed_resize_from_w", -1),
            ("restore_faces", None),
            ("tiling", None),
            ("do_not_save_samples", False),
            ("do_not_save_grid", False),
            ("override_settings_restore_afterwards", True),
            ("refiner_checkpoint", None),
            ("refiner_switch_at", None),
            ("disable_extra_networks", False),
            ("firstpass_image", None),
            ("comments", {}),
            ("script_name", None),
            ("script_args", []),
            ("save_images", False),
            ("infotext", None),
        )
    ),
    *(
        PayloadField(key, default, modes=_TXT)
        for key, default in (
            ("firstphase_width", 0),
            ("firstphase_height", 0),
            ("hr_checkpoint_name", None),
            ("hr_scheduler", None),
            ("hr_prompt", ""),
            ("hr_negative_prompt", ""),
        )
    ),
    *(
        PayloadField(key, default, modes=_IMG)
        for key, default in (
            ("image_cfg_scale", None),
            ("mask_blur_x", 4),
            ("mask_blur_y", 4),
            ("mask_round", True),
            ("initial_noise_multiplier", 1.0),  # A1111: None -> its option, 1.0
            ("latent_mask", None),
            ("include_init_images", False),
        )
    ),
)

# override_settings keys (A1111 option names, modules/shared_options.py) that map onto request fields
# ("hires." ones onto the hires part). A1111's token merging ratio for the hires pass applies when not 0
# (processing.py `get_token_merging_ratio`), as ours does; its img2img ratio (TOME_IMG2IMG) has no field
# of its own: it becomes img2img's token_merging_ratio (see `_overrides`).
OVERRIDE_SETTINGS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "CLIP_stop_at_last_layers": ("clip_skip", _int),
    "eta_noise_seed_delta": ("eta_noise_seed_delta", _int),
    "s_min_uncond_all": ("s_min_uncond_all", _bool),
    "token_merging_ratio": ("token_merging_ratio", _float),
    "token_merging_ratio_hr": ("hires.token_merging_ratio", _float),
}
# Sampler options at these values change nothing; others sent to a sampler without them are reported.
TOME_IMG2IMG = "token_merging_ratio_img2img"
_NEUTRAL = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)}


@dataclass(frozen=True)
class Mapped:
    request: GenerationRequest
    warnings: tuple[str, ...]
    send_images: bool
    checkpoint: str = ""  # override_settings.sd_model_checkpoint: this request's model, by catalogue name
    vae: str = ""  # override_settings.sd_vae: this request's VAE ("Automatic", "None" or a VAE/ file name)
    task_id: str = ""  # force_task_id: the client's id for this job's progress


def _unused(key: str, value: Any, default: Any) -> bool:
    """A1111's "left at default": equal, empty, or (seed resize) not positive."""
    if value == default or value is False or value in (None, [], {}, ""):
        return False
    # A1111 resizes the seed only when > 0
    return not (key.startswith("seed_resize_from_") and value in (0, -1))


def request_from_payload(payload: Mapping[str, Any], mode: str) -> Mapped:
    """The `GenerationRequest` an A1111 payload asks for, the warnings on what it asked that we ignore."""
    if not isinstance(payload, Mapping):
        raise ParameterError("the request body must be a JSON object")
    table = {f.key: f for f in PAYLOAD_FIELDS if mode in f.modes}
    warnings = [f"{key}: not an A1111 {mode} field; ignored" for key in payload if key not in table]
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {"init": {}, "inpaint": {}, "hires": {}}
    options: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in payload.items():
        entry = table.get(key)
        if entry is None:
            continue
        if not entry.target:
            if _unused(key, value, entry.default):
                warnings.append(f"{key}: accepted but not supported yet; ignored")
            continue
        if value is None or entry.read is None:
            if entry.target in ("override_settings", "alwayson_scripts"):
                extras[key] = value
            continue
        read = entry.read(key, value)
        head, _, tail = entry.target.partition(".")
        if head == "sampler_options":
            options[tail] = read
        elif head in parts and tail:
            parts[head][tail] = read
        elif head in _REQUEST_FIELDS:
            top.setdefault(head, read)  # sampler_name stands before sampler_index in the table
        else:
            extras[head] = read
    if "sampler_name" in payload and payload["sampler_name"]:
        top["sampler"] = _str("sampler_name", payload["sampler_name"])
    top.setdefault("sampler", table["sampler_index"].default)
    top.setdefault("steps", table["steps"].default)
    warnings += _overrides(extras.get("override_settings"), mode, top, parts["hires"], extras)
    units, unit_warnings = controlnet_units(extras.get("alwayson_scripts"), mode, parts["init"])
    warnings += unit_warnings
    if units:
        top["controlnet"] = units
    sampler, _ = split_sampler_name(top["sampler"], top.get("schedule", "Automatic"))
    takes = get_sampler(sampler).options
    for name, value in options.items():
        if name == "s_tmax" and value == 0:
            value = math.inf  # A1111: 0 means no upper bound
        if name in takes:
            top.setdefault("sampler_options", {})[name] = value
        elif name != "eta" and value != _NEUTRAL[name]:  # A1111 too ignores eta where a sampler has none
            warnings.append(f"{name}: sampler {sampler!r} does not use it; ignored")
    request = GenerationRequest(**top, **_parts(mode, payload, parts, extras, warnings))
    return Mapped(
        request,
        tuple(warnings),
        extras.get("send_images", True),
        extras.get("checkpoint", ""),
        task_id=extras.get("task_id", ""),
        vae=extras.get("vae", ""),
    )


def _overrides(
    settings: Any, mode: str, top: dict[str, Any], hires: dict[str, Any], extras: dict[str, Any]
) -> list[str]:
    if settings in (None, {}):
        return []
    if not isinstance(settings, Mapping):
        raise ParameterError("override_settings must be an object of A1111 option names")
    warnings = []
    for key, value in settings.items():
        if key in OVERRIDE_SETTINGS:
            target, read = OVERRIDE_SETTINGS[key]
            head, _, tail = target.partition(".")
            if head != "hires":
                top[target] = read(f"override_settings.{key}", value)
            elif mode == "txt2img":  # used with enable_hr only, as the other hires fields
                hires[tail] = read(f"override_settings.{key}", value)
            elif read(f"override_settings.{key}", value):
                warnings.append(f"override_settings.{key}: img2img has no hires pass; ignored")
        elif key == TOME_IMG2IMG:
            ratio = _float(f"override_settings.{key}", value)
            # A1111's img2img: an overridden token_merging_ratio, else this one, else the general one
            if mode == "img2img" and ratio and not settings.get("token_merging_ratio"):
                top["token_merging_ratio"] = ratio
            elif mode != "img2img" and ratio:
                warnings.append(f"override_settings.{key}: used by img2img only; ignored")
        elif key == "sd_model_checkpoint":  # a name, looked up in the catalogue by the server
            extras["checkpoint"] = _str(f"override_settings.{key}", value)
        elif key == "sd_vae":  # likewise
            extras["vae"] = _str(f"override_settings.{key}", value)
        else:
            warnings.append(f"override_settings.{key}: not supported yet; ignored")
    return warnings


def _parts(
    mode: str,
    payload: Mapping[str, Any],
    parts: dict[str, dict[str, Any]],
    extras: Mapping[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    if mode == "txt2img":
        hires = parts["hires"]
        if not extras.get("enable_hr"):
            if payload.get("denoising_strength") is not None:
                warnings.append("denoising_strength: used by txt2img only with enable_hr; ignored")
            if any(k in payload and payload[k] != d for k, d in (("hr_scale", 2.0), ("hr_resize_x", 0))):
                warnings.append("hr_*: hires fields without enable_hr; ignored")
            return {}
        if not hires.get("upscaler"):
            hires["upscaler"] = "Latent"  # A1111's hr_upscaler default (opts / the UI)
        return {"hires": Hires(**hires)}
    init = parts["init"]
    if "images" not in init:
        raise ParameterError("init_images: img2img needs at least one base64 init image")
    init.setdefault("denoising_strength", 0.75)
    result: dict[str, Any] = {"init": InitImage(**init)}
    inpaint = parts["inpaint"]
    if "mask" in inpaint:
        if extras.get("mask_invert"):
            inpaint["mask"] = ImageOps.invert(inpaint["mask"].convert("L"))
        inpaint.setdefault("masked_content", "fill")
        inpaint.setdefault("only_masked", True)
        inpaint.setdefault("only_masked_padding", 0)
        result["inpaint"] = Inpaint(**inpaint)
    # without a mask the inpainting fields mean nothing (A1111 clients send them with every img2img call)
    return result


def parameters(payload: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The response's `parameters`: the payload with A1111's defaults filled in, images left out."""
    table = {f.key: f.default for f in PAYLOAD_FIELDS if mode in f.modes}
    merged = {**table, **payload}
    for key in ("init_images", "mask"):
        if key in merged:
            merged[key] = None
    return merged


# sd-webui-controlnet's API unit (internal_controlnet/external_code.py `ControlNetUnit`): field -> reader.
# Images are read separately (`image`, `input_image`, or {image, mask}); `model` is a catalogue name that
# the server turns into a file of the models folder's ControlNet/ (never a path).
_UNIT_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "module": _str,
    "model": _str,
    "weight": _float,
    "processor_res": _int,
    "threshold_a": _float,
    "threshold_b": _float,
    "guidance_start": _float,
    "guidance_end": _float,
    "pixel_perfect": _bool,
}
# Accepted and not used: the extension's defaults; a unit that sets another value gets a warning.
_UNIT_IGNORED: dict[str, Any] = {
    "enabled": True,
    "low_vram": ...,  # the extension's memory handling: no effect on the image (`...`: never reported)
    "hr_option": "Both",
    # the detected maps are not appended to `images` (as with the extension's control_net_no_detectmap
    # option): /controlnet/detect returns them
    "save_detected_map": ...,
    "guessmode": None,  # pre-1.1 name of control_mode
    "is_ui": ...,
    "input_mode": "simple",
    "batch_images": "",
    "output_dir": "",
    "loopback": False,
    "use_preview_as_input": False,
    "generated_image": None,
    "mask": None,  # read with the image below
    "mask_image": None,
    "advanced_weighting": None,
    "union_control_type": "Unknown",
    "inpaint_crop_input_image": False,
    "effective_region_mask": None,
    "ipadapter_input": None,
    "pulid_mode": "Fidelity",
    "animatediff_batch": False,
    "batch_modifiers": [],
    "batch_image_files": [],
    "batch_keyframe_idx": None,
}
# The names, and the old ones the extension still reads (its ResizeMode enum's aliases).
_RESIZE_NAMES = {n.lower(): i for i, n in enumerate(RESIZE_MODES)}
_RESIZE_NAMES |= {"inner fit (scale to fit)": 1, "outer fit (shrink to fit)": 2, "envelope (outer fit)": 2}
_RESIZE_NAMES["scale to fit (inner fit)"] = 1
_MODE_NAMES = {n.lower(): i for i, n in enumerate(CONTROL_MODES)}


def _choice(key: str, value: Any, valid: tuple[str, ...], aliases: dict[str, int], what: str) -> str:
    """An int index (the extension's enums' int values) or a name, as the canonical name."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(valid):
            raise ParameterError(f"{key} must be 0-{len(valid) - 1} ({', '.join(valid)}), got {value!r}")
        return valid[value]
    try:
        return canonical(_str(key, value), valid, aliases, what)
    except ParameterError as error:
        raise ParameterError(f"{key}: {error}") from None


def _unit_image(key: str, unit: Mapping[str, Any], mode: str, init: Mapping[str, Any]) -> Image.Image:
    """A unit's control image: `image` or `input_image`, base64 or {image, mask}; img2img falls back to the
    init image (as the extension does when a unit has none)."""
    value = unit.get("image") or unit.get("input_image")
    if isinstance(value, Mapping):
        value = value.get("image")
    if value:
        return decode_image(f"{key}.image", value)
    if mode == "img2img" and init.get("images"):
        return init["images"][0]
    raise ParameterError(f"{key}: an enabled ControlNet unit needs an `image` (base64) in txt2img")


def controlnet_units(
    scripts: Any, mode: str, init: Mapping[str, Any]
) -> tuple[tuple[ControlNetUnit, ...], list[str]]:
    """The enabled units of `alwayson_scripts.controlnet.args` (disabled ones skipped), and warnings for
    other scripts and for unit fields we accept without using."""
    if scripts in (None, {}):
        return (), []
    if not isinstance(scripts, Mapping):
        raise ParameterError("alwayson_scripts must be an object {script name: {args: [...]}}")
    warnings, units = [], []
    for name, script in scripts.items():
        args = script.get("args") if isinstance(script, Mapping) else script
        if str(name).lower() != "controlnet":  # A1111 matches script titles case-insensitively
            if args not in ([], [False], None, False):
                warnings.append(f"alwayson_scripts.{name}: not supported; ignored")
            continue
        if not isinstance(args, list):
            raise ParameterError(f"alwayson_scripts.{name}.args must be a list of ControlNet units")
        for i, unit in enumerate(args):
            key = f"alwayson_scripts.{name}.args[{i}]"
            if unit in (None, False):
                continue
            if not isinstance(unit, Mapping):
                raise ParameterError(f"{key} must be a ControlNet unit object, got {type(unit).__name__}")
            if not _bool(f"{key}.enabled", unit.get("enabled", True)):
                continue
            units.append(_unit(key, unit, mode, init, warnings))
    return tuple(units), warnings


def _unit(
    key: str, unit: Mapping[str, Any], mode: str, init: Mapping[str, Any], warnings: list[str]
) -> ControlNetUnit:
    values: dict[str, Any] = {}
    for field_name, value in unit.items():
        where = f"{key}.{field_name}"
        if field_name in _UNIT_FIELDS:
            if value is not None:
                values[field_name] = _UNIT_FIELDS[field_name](where, value)
        elif field_name == "resize_mode":
            values[field_name] = _choice(where, value, RESIZE_MODES, _RESIZE_NAMES, "resize mode")
        elif field_name == "control_mode":
            values[field_name] = _choice(where, value, CONTROL_MODES, _MODE_NAMES, "control mode")
        elif field_name in ("image", "input_image"):
            continue
        elif field_name in _UNIT_IGNORED:
            default = _UNIT_IGNORED[field_name]
            if field_name == "mask" and isinstance(unit.get("image"), Mapping):
                value = unit["image"].get("mask")
            unset = value in (default, None, "", [], {}) or default is ...
            if field_name != "enabled" and not unset:
                warnings.append(f"{where}: accepted but not supported; ignored")
        else:
            warnings.append(f"{where}: not a ControlNet unit field; ignored")
    if isinstance(unit.get("image"), Mapping) and unit["image"].get("mask") and "mask" not in unit:
        warnings.append(f"{key}.image.mask: a unit's own mask is not supported; ignored")
    model = values.get("model", "None")
    if model in ("", "None", "none"):
        raise ParameterError(f"{key}.model: name a ControlNet of GET /controlnet/model_list")
    get_preprocessor(values.get("module", "none"))  # an unknown module: 422 before queueing
    return ControlNetUnit(image=_unit_image(key, unit, mode, init), **values)
