"""One generation request, resolved once, and its A1111 infotext both ways.

`GenerationRequest` is what every front end builds (CLI, Python API, evaluation, HTTP server): the
txt2img fields with A1111's API names, plus optional parts for img2img (`init`), inpainting and
outpainting (`inpaint`) and the hires fix (`hires`). `resolve(request, model)` validates it, fills the
family's defaults, draws random seeds and looks the sampler up once; everything downstream reads the
`ResolvedRequest` and never looks a name up again.

Its A1111 infotext, both ways, is `pipelines.request_infotext`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from PIL import Image

from latentforge.errors import ParameterError
from latentforge.models.deepcache import input_block_count
from latentforge.pipelines import adapters
from latentforge.pipelines.controlnet import ControlNetUnit, check_unit
from latentforge.pipelines.seeds import resolve_seed
from latentforge.prompts.parser import parse_attention
from latentforge.sampling.registry import (
    OptionValue,
    Sampler,
    check_options,
    get_sampler,
    resolve_schedule,
    split_sampler_name,
)

if TYPE_CHECKING:
    from latentforge.model import StableDiffusion
    from latentforge.models.families import ModelFamily

MAX_STEPS = 1000
MAX_BATCH = 64  # images per forward pass
MAX_IMAGES = 10_000  # images per request
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_SIDE = 16384  # pixels per side, ComfyUI's MAX_RESOLUTION (nodes.py): 100000x8 passes the pixel limit
DEFAULT_TILED_VAE_PIXELS = 1536 * 1536
MAX_MASK_BLUR = 256  # pixels of Gaussian sigma (A1111's slider stops at 64)
MAX_MARGIN = 4096  # outpainting pixels per side
# Characters per prompt: ~8k CLIP tokens, 100+ 75-token chunks, far above real prompts; a 10 MB infotext
# prompt took 5 s in parse_attention alone and minutes in the text encoder (issue 19).
MAX_PROMPT_CHARS = 32_768
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


@dataclass(frozen=True)
class InitImage:
    """img2img: start from these images (one for all, or one per batch image), noised to the strength."""

    images: tuple[Image.Image, ...] = field(default=(), compare=False, repr=False)
    denoising_strength: float = 0.75


@dataclass(frozen=True)
class Inpaint:
    """Inpainting (white in `mask` = repaint) or, with `outpaint` margins, outpainting of the init image."""

    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    mask_blur: float = 4.0
    masked_content: str = "original"
    only_masked: bool = False  # A1111's "Inpaint area: Only masked"
    only_masked_padding: int = 32
    latent_blend: bool = True  # blend x0 with the init latents outside the mask after every step
    outpaint: tuple[int, int, int, int] | None = None  # left, right, top, bottom margins in pixels


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: txt2img at the request's size, upscaled, then an img2img pass at the target."""

    scale: float = 2.0
    resize_width: int = 0  # "Resize width/height to": one alone keeps the aspect ratio
    resize_height: int = 0
    upscaler: str = "Latent"
    steps: int = 0  # 0: the first pass's steps
    denoising_strength: float = 0.7
    sampler: str = ""  # "": the first pass's sampler
    # ToMe ratio of this pass; 0: the first pass's (A1111's "Token merging ratio hr")
    token_merging_ratio: float = 0.0


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size/crop conditioning (`vector`), sizes as (width, height); (0, 0): the pass's image size,
    and a negative (0, 0) the positive's (A1111 and diffusers defaults; ComfyUI's CLIPTextEncodeSDXL sets
    each). The aesthetic scores condition the refiner (A1111's defaults 6 and 2.5)."""

    original_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left), as sgm's crop_coords_top_left
    target_size: tuple[int, int] = (0, 0)
    negative_original_size: tuple[int, int] = (0, 0)
    negative_crop_top_left: tuple[int, int] | None = None  # None: the positive's
    negative_target_size: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class Refiner:
    """A1111's SDXL refiner: the same sampler continues on the refiner model from `switch_at` (the
    fraction of the model's timesteps done). `checkpoint` is A1111's "name [hash]", filled by `resolve`."""

    checkpoint: str = ""
    switch_at: float = 0.8


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"  # also A1111's combined names before 1.9 ("DPM++ 2M Karras")
    schedule: str = "Automatic"
    cfg_scale: float = 7.0
    cfg_rescale: float = 0.0
    seed: int = -1  # -1: random, reported in the result
    subseed: int = -1
    subseed_strength: float = 0.0  # A1111's variation seed
    width: int = 0  # 0: the family's default size (the image's size for img2img and inpainting)
    height: int = 0
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 0  # 0: the family's default (1 for SD 1.x, 2 for SD 2.x), also once resolved
    eta: float | None = None  # the sampler's eta (ancestral/SDE noise, DDIM's eta); its default when None
    sampler_options: Mapping[str, OptionValue] = field(default_factory=dict)  # s_noise, order, ...
    eta_noise_seed_delta: int = 0  # A1111's ENSD: step noise from seed + delta
    tiled_vae: bool | None = None  # None: tiles above `tiled_vae_pixels` only
    tiled_vae_pixels: int = DEFAULT_TILED_VAE_PIXELS
    sigmas: tuple[float, ...] = ()  # explicit schedule (descending, A1111's sampler_noise_scheduler_override)
    prompt_seeds: tuple[tuple[str, int], ...] = ()  # one image per (prompt, seed); replaces prompt/seed/count
    init: InitImage | None = None
    inpaint: Inpaint | None = None
    hires: Hires | None = None
    controlnet: tuple[ControlNetUnit, ...] = ()  # ControlNet units, applied together in every pass
    size_cond: SizeConditioning | None = None  # SDXL only; None: the defaults
    refiner: Refiner | None = None  # SDXL only; the refiner model is passed to the runner
    model: str = ""  # the model's name and hash, VAE file and hash: filled in by `resolve`, checked there
    model_hash: str = ""
    vae: str = ""
    vae_hash: str = ""
    lora_hashes: str = ""  # A1111's "Lora hashes"/"TI hashes" ("name: hash, ..."): filled in by `resolve`
    ti_hashes: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)  # infotext keys no field holds, kept verbatim
    # Speed options (docs/performance.md); every default is the exact path.
    s_min_uncond: float = 0.0  # A1111's NGMS: below this sigma skip the uncond pass on every other call
    s_min_uncond_all: bool = False  # A1111's "NGMS all steps": ... on every call
    cfg_cutoff: float = 1.0  # fraction of steps with CFG, cond only after (diffusers' SDCFGCutoffCallback)
    fast_decode: bool = False  # decode with the model's TAESD instead of its VAE
    token_merging_ratio: float = 0.0  # ToMe for SD in the self-attention (A1111's "Token merging ratio")
    token_merging_max_downsample: int = 1  # blocks at most this many times downsampled (1, 2, 4, 8)
    token_merging_random: bool = False  # random dst tokens (tomesd's use_rand), drawn from the batch's seed
    deepcache_interval: int = (
        0  # DeepCache: a full U-Net evaluation every N, the shallow branch between (0, 1: off)
    )
    deepcache_branch: int = (
        0  # DeepCache's shallow branch: input blocks 0..b and the last b + 1 output blocks
    )

    def use_tiled_vae(self, width: int, height: int) -> bool:
        """Whether the VAE runs in tiles for an image of this size."""
        return self.tiled_vae if self.tiled_vae is not None else width * height > self.tiled_vae_pixels

    @property
    def mode(self) -> str:
        return "inpaint" if self.inpaint else "img2img" if self.init else "hires" if self.hires else "txt2img"

    @property
    def denoising_strength(self) -> float | None:
        part = self.init or self.hires
        return None if part is None else part.denoising_strength


@dataclass(frozen=True)
class Batch:
    """The images of one forward pass: a prompt, seed and variation seed each."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    subseeds: tuple[int, ...]
    # the `<lora:>` tags of the batch's first prompt (A1111's `parse_prompts`), applied around the batch
    loras: tuple[adapters.ResolvedLora, ...] = ()
    ti_hashes: tuple[str, ...] = ()  # per image
    start: int = 0  # the index of its first image among the request's images


@dataclass(frozen=True)
class Pass:
    """One sampling pass: the sampler looked up once, its schedule name, steps and options."""

    sampler_name: str
    sampler: Sampler
    schedule: str
    steps: int
    options: Mapping[str, OptionValue]


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in and every name looked up; what the runner reads."""

    request: GenerationRequest
    first: Pass
    second: Pass | None  # the hires pass
    batches: tuple[Batch, ...]

    def image_request(self, batch: Batch, i: int) -> GenerationRequest:
        """The request that makes image i of a batch alone: what its infotext describes."""
        return replace(
            self.request,
            prompt=batch.prompts[i],
            seed=batch.seeds[i],
            subseed=batch.subseeds[i],
            batch_size=1,
            batch_count=1,
            prompt_seeds=(),
            lora_hashes=adapters.lora_hashes(batch.loras),
            ti_hashes=batch.ti_hashes[i] if batch.ti_hashes else "",
        )


def latent_multiple(family: ModelFamily) -> int:
    """Image sizes must be multiples of the VAE factor; the U-Net takes any latent size."""
    return family.vae.downsampling_factor


def check_size(family: ModelFamily, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Sizes are never changed silently: one the VAE cannot take is an error naming the nearest valid one."""
    multiple = latent_multiple(family)
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ParameterError(
                f"{name} {value} is not a positive multiple of {multiple} (the VAE's factor for this "
                f"model); nearest valid: {nearest}"
            )
        if value > MAX_SIDE:
            raise ParameterError(f"{name} {value} exceeds the limit of {MAX_SIDE} pixels per side")
    if width * height > max_pixels:
        raise ParameterError(f"{width}x{height} exceeds the limit of {max_pixels} pixels")


def _finite(name: str, value: float, low: float = -math.inf, high: float = math.inf) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        bounds = f" in [{low:g}, {high:g}]" if math.isfinite(low) or math.isfinite(high) else ""
        raise ParameterError(f"{name} must be a finite number{bounds}, got {value!r}")


def _whole(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ParameterError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")


def _sampler_pass(name: str, schedule: str, steps: int, options: Mapping[str, OptionValue]) -> Pass:
    name, schedule = split_sampler_name(name, schedule)
    spec = get_sampler(name)
    return Pass(name, spec, resolve_schedule(name, schedule), steps, dict(options))


def _split_options(
    options: Mapping[str, OptionValue], first: str, second: str | None
) -> tuple[dict[str, OptionValue], dict[str, OptionValue]]:
    """Each pass gets the options its sampler takes; one that neither takes is an error naming who does."""
    mine: dict[str, OptionValue] = {}
    theirs: dict[str, OptionValue] = {}
    for key, value in options.items():
        takers = [s for s in (first, second) if s and key in get_sampler(s).options]
        if not takers:
            check_options(first, {key: value})  # raises, naming the samplers that take it
        for sampler in takers:
            check_options(sampler, {key: value})
            (mine if sampler == first else theirs)[key] = value
    return mine, theirs


def resolve(
    request: GenerationRequest,
    model: StableDiffusion,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    refiner: StableDiffusion | None = None,
) -> ResolvedRequest:
    """Validate before any work, fill in the family's defaults, draw seeds, look the samplers up once."""
    family = model.family
    r = request
    _whole("steps", r.steps, 1, MAX_STEPS)
    _finite("CFG scale", r.cfg_scale)
    _finite("CFG rescale", r.cfg_rescale, 0, 1)
    _finite("NGMS (s_min_uncond)", r.s_min_uncond, 0)
    _finite("CFG cutoff (cfg_cutoff)", r.cfg_cutoff, 0, 1)
    # 0.75 = 1 - 1/(sx*sy): every src token merged
    _finite("token merging ratio (token_merging_ratio)", r.token_merging_ratio, 0, 0.75)
    if r.token_merging_max_downsample not in (1, 2, 4, 8):
        raise ParameterError(
            "token merging max downsample (token_merging_max_downsample) must be 1, 2, 4 or 8, got "
            f"{r.token_merging_max_downsample!r}"
        )
    _whole("DeepCache interval (deepcache_interval)", r.deepcache_interval, 0, MAX_STEPS)
    _whole("DeepCache branch (deepcache_branch)", r.deepcache_branch, 0, input_block_count(family.unet) - 1)
    if r.fast_decode and model.taesd is None:
        raise ParameterError(
            "fast decode (fast_decode) needs TAESD weights: pass --taesd DIR holding taesd_decoder.pth "
            "(taesdxl_ for SDXL) from github.com/madebyollin/taesd, or set model.taesd = "
            "checkpoints.taesd.read_taesd(DIR)"
        )
    _finite("variation seed strength", r.subseed_strength, 0, 1)
    _whole("batch size", r.batch_size, 1, MAX_BATCH)
    _whole("batch count", r.batch_count, 1, MAX_IMAGES)
    _whole("clip skip", r.clip_skip, 0, family.text_encoder.layers)
    _whole("eta noise seed delta", r.eta_noise_seed_delta, 0, 2**32)
    if r.batch_size * r.batch_count > MAX_IMAGES or len(r.prompt_seeds) > MAX_IMAGES:
        raise ParameterError(f"a request makes at most {MAX_IMAGES} images")
    for key in ("seed", "subseed"):
        _whole(key, getattr(r, key), -1, 2**63 - 1)
    for text in {r.prompt, r.negative_prompt, *(p for p, _ in r.prompt_seeds)}:
        if len(text) > MAX_PROMPT_CHARS:
            raise ParameterError(
                f"a prompt of {len(text)} characters is too long: the limit is {MAX_PROMPT_CHARS} (starts "
                f"{text[:40]!r})"
            )
        parse_attention(text)  # bracket depth and weights checked before any work
        try:  # undecodable command-line bytes arrive as surrogates; the PNG infotext cannot hold them
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ParameterError(
                f"the prompt {text[:40]!r} is not valid UTF-8 (byte {error.object[error.start]!r} at "
                f"{error.start}); re-type it or fix the file it came from"
            ) from None
    width, height = r.width, r.height
    if r.init is not None:
        _finite("denoising strength", r.init.denoising_strength, 0, 1)
        if r.init.images and not (width and height):
            w, h = r.init.images[0].size
            if r.inpaint is not None and r.inpaint.outpaint is not None:
                left, right, top, bottom = _margins(r.inpaint.outpaint)
                w, h = w + left + right, h + top + bottom
            width, height = width or w, height or h
    elif r.inpaint is not None:
        raise ParameterError("inpainting needs an init image (the picture to repaint)")
    width, height = width or family.default_size, height or family.default_size
    check_size(family, width, height, max_pixels)
    if r.inpaint is not None:
        _check_inpaint(r.inpaint)
    eta_options = {} if r.eta is None else {"eta": r.eta}
    options = {**r.sampler_options, **eta_options}
    hires_sampler = None
    if r.hires is not None:
        hires_sampler = split_sampler_name(r.hires.sampler)[0] if r.hires.sampler else None
    first_name = split_sampler_name(r.sampler, r.schedule)[0]
    first_options, second_options = _split_options(options, first_name, hires_sampler or first_name)
    first = _sampler_pass(r.sampler, r.schedule, r.steps, first_options)
    second = None
    if r.hires is not None:
        second = _hires_pass(r.hires, first, second_options if hires_sampler else first_options, r.schedule)
        _check_hires(r.hires, family, width, height, max_pixels)
    if r.sigmas and (len(r.sigmas) < 2 or any(not math.isfinite(s) or s < 0 for s in r.sigmas)):
        raise ParameterError("sigmas must be at least two finite, non-negative numbers")
    _check_sdxl(r, family, refiner)
    seed = resolve_seed(r.seed)
    subseed = resolve_seed(r.subseed) if r.subseed_strength > 0 else r.subseed
    if r.model_hash and model.short_hash and r.model_hash != model.short_hash:
        warnings.warn(
            f"the request was made with model hash {r.model_hash} ({r.model or 'unnamed'}); the loaded model "
            f"{model.name} has {model.short_hash}: the image will differ",
            stacklevel=2,
        )
    vae_name, vae_hash = model.vae_name or "", model.vae_hash or ""
    if r.vae_hash and r.vae_hash != vae_hash:
        warnings.warn(
            f"the request names VAE {r.vae or r.vae_hash} ({r.vae_hash}); the loaded model decodes with "
            f"{vae_name or 'its own VAE'}: colours and details will differ",
            stacklevel=2,
        )
    resolved = replace(
        r,
        sampler=first.sampler_name,
        schedule=first.schedule,
        seed=seed,
        subseed=subseed,
        width=width,
        height=height,
        model=model.name,
        model_hash=model.short_hash or "",
        vae=vae_name,
        vae_hash=vae_hash,
        hires=_resolved_hires(r.hires, first, second),
        controlnet=_resolved_units(r.controlnet, family),
        refiner=_resolved_refiner(r.refiner, refiner),  # None without a refiner model
        deepcache_interval=r.deepcache_interval if r.deepcache_interval > 1 else 0,  # 1 is off: no key
        deepcache_branch=r.deepcache_branch if r.deepcache_interval > 1 else 0,
    )
    batches = _with_adapters(model, resolved, request)
    lora_hashes, ti_hashes = adapters.lora_hashes(batches[0].loras), batches[0].ti_hashes[0]
    return ResolvedRequest(
        replace(resolved, lora_hashes=lora_hashes, ti_hashes=ti_hashes), first, second, batches
    )


def _with_adapters(
    model: StableDiffusion, r: GenerationRequest, asked: GenerationRequest
) -> tuple[Batch, ...]:
    """Batches with their `<lora:>` files (resolved once per distinct prompt) and `TI hashes`."""
    adapters.warn_negative_tags(r.negative_prompt)
    if asked.ti_hashes:
        adapters.check_embedding_hashes(model, asked.ti_hashes)
    loras: dict[str, tuple[adapters.ResolvedLora, ...]] = {}
    ti: dict[str, str] = {}  # per distinct prompt: a long batch count tokenizes each prompt once
    out = []
    for batch in _batches(r):
        first = batch.prompts[0]
        if first not in loras:
            loras[first] = adapters.resolve_loras(model, first, asked.lora_hashes)
        for p in batch.prompts:
            if p not in ti:
                ti[p] = adapters.embedding_hashes(model, [p, r.negative_prompt], r.steps)
        out.append(replace(batch, loras=loras[first], ti_hashes=tuple(ti[p] for p in batch.prompts)))
    return tuple(out)


def _resolved_units(units: Sequence[ControlNetUnit], family: ModelFamily) -> tuple[ControlNetUnit, ...]:
    """Checked units; one with neither image nor network (read from an infotext) is dropped with a warning."""
    kept = []
    for i, unit in enumerate(units):
        if unit.image is None and unit.network is None:
            warnings.warn(
                f"ControlNet unit {i} ({unit.module}, {unit.model or 'no model'}) has no control image or "
                "loaded ControlNet, so it is left out: the image will differ",
                stacklevel=3,
            )
            continue
        kept.append(check_unit(unit, i, family.unet.context_dim, family.vae.downsampling_factor))
    return tuple(kept)


def _check_sdxl(r: GenerationRequest, family: ModelFamily, refiner: StableDiffusion | None) -> None:
    """SDXL parts only on SDXL models; a refiner only refines."""
    if family.is_refiner and r.init is None:
        raise ParameterError(
            f"{family.name} is an SDXL refiner: it only refines (img2img, or after a base model); load an "
            "SDXL base model and pass this one as the refiner (--refiner MODEL)"
        )
    if r.size_cond is not None:
        if not family.is_sdxl:
            raise ParameterError(f"size conditioning is for SDXL models; {family.name} has none")
        for name in ("original_size", "crop_top_left", "target_size", "negative_original_size"):
            for value in getattr(r.size_cond, name):
                _whole(name.replace("_", " "), value, 0, MAX_SIDE)
        _finite("aesthetic score", r.size_cond.aesthetic_score)
        _finite("negative aesthetic score", r.size_cond.negative_aesthetic_score)
    if r.refiner is None and refiner is not None:
        raise ParameterError("the request has a refiner model but no refiner part: pass both or neither")
    if r.refiner is not None and refiner is None:  # e.g. an A1111 infotext: as a model hash mismatch
        warnings.warn(
            f"the request names refiner {r.refiner.checkpoint or '(unnamed)'}; none is loaded (--refiner "
            "MODEL), so the image is made without it and will differ",
            stacklevel=3,
        )
    if r.refiner is not None and refiner is not None:
        _finite("refiner switch at", r.refiner.switch_at, 0, 1)
        if not (family.is_sdxl and refiner.family.is_sdxl):
            raise ParameterError(
                f"a refiner continues an SDXL model on another SDXL model; got {family.name} and "
                f"{refiner.family.name}"
            )


def _resolved_refiner(part: Refiner | None, refiner: StableDiffusion | None) -> Refiner | None:
    if part is None or refiner is None:
        return None
    label = f"{refiner.name} [{refiner.short_hash}]" if refiner.short_hash else refiner.name
    return replace(part, checkpoint=label)


def _resolved_hires(hires: Hires | None, first: Pass, second: Pass | None) -> Hires | None:
    """Canonical upscaler name; the hires sampler named only where it differs from the first pass's."""
    if hires is None or second is None:
        return None
    if second.schedule != first.schedule:  # A1111's combined form carries the schedule: "Euler Karras"
        sampler = f"{second.sampler_name} {second.schedule}"
    else:
        sampler = "" if second.sampler_name == first.sampler_name else second.sampler_name
    return replace(hires, upscaler=upscaler_name(hires.upscaler), sampler=sampler)


def _hires_pass(hires: Hires, first: Pass, options: Mapping[str, OptionValue], schedule: str) -> Pass:
    """The second pass: the first's sampler, or its own (the request's schedule or a combined name's)."""
    _whole("hires steps", hires.steps, 0, MAX_STEPS)
    _finite("hires denoising strength", hires.denoising_strength, 0, 1)
    _finite("hires token merging ratio (token_merging_ratio_hr)", hires.token_merging_ratio, 0, 0.75)
    if not hires.sampler:
        return replace(first, steps=hires.steps or first.steps, options=dict(options))
    return _sampler_pass(hires.sampler, schedule, hires.steps or first.steps, options)


def _check_hires(hires: Hires, family: ModelFamily, width: int, height: int, max_pixels: int) -> None:
    _whole("hires resize width", hires.resize_width, 0, 2**16)
    _whole("hires resize height", hires.resize_height, 0, 2**16)
    if not (hires.resize_width or hires.resize_height):
        _finite("hires scale", hires.scale, 0.01, 16)
    cover, final = hires_size(
        width, height, scale=hires.scale, resize_width=hires.resize_width, resize_height=hires.resize_height
    )
    check_size(family, *final, max_pixels)
    check_size(family, *cover, max_pixels)


def _margins(margins: Sequence[int]) -> tuple[int, int, int, int]:
    if len(margins) != 4:
        raise ParameterError(f"outpaint margins are left, right, top, bottom; got {tuple(margins)}")
    for value in margins:
        _whole("outpaint margin", value, 0, MAX_MARGIN)
    if sum(margins) == 0:
        raise ParameterError("outpainting needs at least one positive margin")
    left, right, top, bottom = margins
    return left, right, top, bottom


def _check_inpaint(part: Inpaint) -> None:
    _finite("mask blur", part.mask_blur, 0, MAX_MASK_BLUR)
    if part.outpaint is not None:  # also with an explicit size, which skips the canvas-size branch
        _margins(part.outpaint)
    _whole("only-masked padding", part.only_masked_padding, 0, MAX_MARGIN)
    if part.masked_content not in MASKED_CONTENT:
        valid = ", ".join(MASKED_CONTENT)
        raise ParameterError(f"unknown masked content {part.masked_content!r}; valid: {valid}")


def _batches(r: GenerationRequest) -> list[Batch]:
    """Image i has seed + i (one seed for all with a variation seed, as A1111); explicit pairs as given.

    Image i is in batch i // batch_size, whoever makes it (`pipelines.sharding` relies on this)."""
    if r.prompt_seeds:
        pairs = list(r.prompt_seeds)
        subseeds = [r.subseed] * len(pairs)
    else:
        step = 0 if r.subseed_strength else 1
        count = r.batch_size * r.batch_count
        pairs = [(r.prompt, r.seed + i * step) for i in range(count)]
        subseeds = [r.subseed + i for i in range(count)]
    batches = []
    for start in range(0, len(pairs), r.batch_size):
        chunk = pairs[start : start + r.batch_size]
        batches.append(
            Batch(
                tuple(p for p, _ in chunk),
                tuple(s for _, s in chunk),
                tuple(subseeds[start : start + len(chunk)]),
                start=start,
            )
        )
    return batches


@dataclass(frozen=True)
class Upscaler:
    mode: str  # torch interpolate mode (latent upscalers) or a PIL filter name (pixel upscalers)
    antialias: bool = False
    latent: bool = True


# A1111's names: the "Latent ..." modes of shared.latent_upscale_modes, and two plain pixel filters.
UPSCALERS: dict[str, Upscaler] = {
    "Latent": Upscaler("bilinear"),
    "Latent (antialiased)": Upscaler("bilinear", antialias=True),
    "Latent (bicubic)": Upscaler("bicubic"),
    "Latent (bicubic antialiased)": Upscaler("bicubic", antialias=True),
    "Latent (nearest)": Upscaler("nearest"),
    "Latent (nearest-exact)": Upscaler("nearest-exact"),
    "Lanczos": Upscaler("LANCZOS", latent=False),
    "Nearest": Upscaler("NEAREST", latent=False),
}


def upscaler_name(name: str) -> str:
    """The canonical name of an upscaler, matched case-insensitively.

    Names of A1111's model upscalers we do not have (R-ESRGAN 4x+, SwinIR ...) fall back to Lanczos with a
    warning, as a pixel upscaler is what they were; an unknown "Latent ..." name is an error.
    """
    for known in UPSCALERS:
        if known.lower() == name.lower():
            return known
    if name.lower().startswith("latent") or not name.strip():
        raise ParameterError(f"unknown upscaler {name!r}; valid: {', '.join(UPSCALERS)}")
    valid = ", ".join(UPSCALERS)
    warnings.warn(f"upscaler {name!r} is not available here; using Lanczos (valid: {valid})", stacklevel=3)
    return "Lanczos"


def hires_size(
    width: int, height: int, *, scale: float, resize_width: int = 0, resize_height: int = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((upscale width, height), (final width, height)) as A1111's calculate_target_resolution.

    With both resize sides given and another aspect ratio, the image is upscaled to cover them and
    the excess is cropped from the centre.
    """
    if not resize_width and not resize_height:
        target = (int(width * scale), int(height * scale))
        return target, target
    if not resize_height:
        size = (resize_width, resize_width * height // width)
        return size, size
    if not resize_width:
        size = (resize_height * width // height, resize_height)
        return size, size
    if width / height < resize_width / resize_height:
        cover = (resize_width, resize_width * height // width)
    else:
        cover = (resize_height * width // height, resize_height)
    return cover, (resize_width, resize_height)
