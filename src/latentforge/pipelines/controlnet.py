"""ControlNet units of a request: the hint image each one is built from, and the denoiser that adds them.

A unit follows sd-webui-controlnet (`internal_controlnet/args.py`, `scripts/hook.py`, `controlnet.py`):
    hint     = resize_mode(preprocess(image, processor_res)) at the pass's size, in [0, 1]
    residual = weight * s_i * ControlNet(x_in, t, context, hint)_i,  s_i = 1 (Balanced), or
               s_i = 0.825 ** (12 - i) for the soft modes ("My prompt is more important", "ControlNet is
               more important"; i = 0..12 for SD's 12 skips and the middle block, hook.py)
    active at step k of n when start <= k / n <= end (A1111's `guidance_stopped` rule)
"ControlNet is more important" (and the shuffle model's global pooling) also zeroes the unconditional half
of the CFG batch (hook.py's `cond_mark`); we run the ControlNet on the conditional rows only, which gives the
same residuals at half the cost. Several units add their residuals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from latentforge.checkpoints.controlnet import ControlNet
from latentforge.data.images import to_rgb
from latentforge.errors import ParameterError
from latentforge.pipelines.preprocessors import get_preprocessor, run_preprocessor
from latentforge.pipelines.prompt_guidance import step_of

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's ResizeMode values
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
SOFT_WEIGHT_BASE = 0.825  # hook.py: control_scales = [weight * 0.825 ** (12 - i) for i in range(13)]
_RESIZE_ALIASES = {
    "resize": 0,
    "just resize": 0,
    "crop": 1,
    "crop and resize": 1,
    "fill": 2,
    "resize and fill": 2,
}
_MODE_ALIASES = {"balanced": 0, "prompt": 1, "my prompt is more important": 1, "control": 2}
_MODE_ALIASES["controlnet is more important"] = 2


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit (the extension's `ControlNetUnit` fields that its infotext carries)."""

    image: Image.Image | None = field(default=None, compare=False, repr=False)
    network: ControlNet | None = field(default=None, compare=False, repr=False)
    module: str = "none"
    model: str = ""  # "name [hash]": filled from `network` by `resolve`
    weight: float = 1.0
    resize_mode: str = "Crop and Resize"
    processor_res: int = 512  # the extension's -1 reads as the module's default, 512
    threshold_a: float = -1  # -1: the module's default (canny low 100, threshold level 127 ...)
    threshold_b: float = -1
    guidance_start: float = 0.0  # fractions of the steps of each pass
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"

    def soft_scales(self, blocks: int, soft: bool) -> list[float]:
        """Per-residual scales: `weight`, or the soft rule's weight * 0.825 ** (blocks - 1 - i)."""
        if not soft:
            return [self.weight] * blocks
        return [self.weight * SOFT_WEIGHT_BASE ** float(blocks - 1 - i) for i in range(blocks)]


def canonical(name: str, valid: tuple[str, ...], aliases: dict[str, int], what: str) -> str:
    key = name.strip().lower()
    if key in aliases:
        return valid[aliases[key]]
    raise ParameterError(f"unknown ControlNet {what} {name!r}; valid: {', '.join(valid)}")


def check_unit(unit: ControlNetUnit, index: int, context_dim: int, latent_factor: int) -> ControlNetUnit:
    """Validate one unit before any work; returns it with canonical names and its model title."""
    where = f"ControlNet unit {index}"
    spec = get_preprocessor(unit.module)
    if unit.network is None:
        raise ParameterError(
            f"{where} names model {unit.model or '(none)'!r} but no ControlNet is loaded for it: load it "
            "(--controlnet PATH, or latentforge.load_controlnet)"
        )
    if unit.image is None:
        raise ParameterError(f"{where} has no control image (--control-image PATH)")
    if not isinstance(unit.image, Image.Image) or min(unit.image.size) < 1:
        raise ParameterError(f"{where}: the control image must be a non-empty PIL image")
    config = unit.network.model.config
    if config.unet.context_dim != context_dim or config.downsampling_factor != latent_factor:
        raise ParameterError(
            f"{where}: ControlNet {unit.network.title} was made for another model family (text width "
            f"{config.unet.context_dim}, image factor {config.downsampling_factor}); this model has "
            f"{context_dim} and {latent_factor} (an SD 1.x ControlNet needs an SD 1.x model, SD 2.x likewise)"
        )
    for name, low, high in (("weight", 0, 2), ("guidance_start", 0, 1), ("guidance_end", 0, 1)):
        value = getattr(unit, name)
        if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
            raise ParameterError(f"{where}: {name} must be a number in [{low}, {high}], got {value!r}")
    if unit.guidance_start > unit.guidance_end:
        raise ParameterError(
            f"{where}: guidance start {unit.guidance_start} is after guidance end {unit.guidance_end}"
        )
    if not 64 <= unit.processor_res <= 4096 and unit.processor_res != -1:
        raise ParameterError(f"{where}: processor resolution must be in [64, 4096], got {unit.processor_res}")
    return replace(
        unit,
        resize_mode=canonical(unit.resize_mode, RESIZE_MODES, _RESIZE_ALIASES, "resize mode"),
        control_mode=canonical(unit.control_mode, CONTROL_MODES, _MODE_ALIASES, "control mode"),
        processor_res=512 if unit.processor_res == -1 else unit.processor_res,
        # the values used, as the extension writes them (-1 stays for modules without the slider)
        threshold_a=spec.threshold_a[1] if spec.threshold_a and unit.threshold_a == -1 else unit.threshold_a,
        threshold_b=spec.threshold_b[1] if spec.threshold_b and unit.threshold_b == -1 else unit.threshold_b,
        model=unit.network.title,
    )


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution that lands the map on the target pixels (external_code.py)."""
    raw_w, raw_h = size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    return int(np.round(k * min(raw_h, raw_w)))


def _resize_map(detected: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a detected map; binary maps (two colours, dark and light) are re-binarised with Otsu.

    A shortened form of the extension's `high_quality_resize`: area down, cubic up, nearest for maps of few
    colours (segmentation), Otsu for binary edges; without its one-pixel-edge thinning.
    """
    import cv2

    if detected.shape[:2] == (height, width):
        return detected
    colours = len(np.unique(detected.reshape(-1, detected.shape[2]), axis=0))
    smaller = width * height < detected.shape[0] * detected.shape[1]
    interpolation = cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    out = cv2.resize(detected, (width, height), interpolation=interpolation)
    if out.ndim == 2:
        out = out[:, :, None]
    if colours == 2 and detected.min() < 16 and detected.max() > 240 and detected.shape[2] == 3:
        grey = out.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        _, binary = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        out = np.repeat(binary[:, :, None], 3, axis=2)
    return out


def fit_map(detected: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """A detected map [h, w, C] at the target size by the unit's resize mode (`detectmap_proc`)."""
    if resize_mode == "Just Resize":
        return _resize_map(detected, width, height)
    old_h, old_w = detected.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    if resize_mode == "Resize and Fill":  # fit inside, pad with the median border colour
        k = min(k_h, k_w)
        borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]], axis=0)
        colour = np.median(borders, axis=0).astype(detected.dtype)
        if len(colour) == 4:
            colour[3] = 255  # inpaint maps: the padding is to be painted
        inner = _resize_map(detected, max(1, round(old_w * k)), max(1, round(old_h * k)))
        canvas = np.tile(colour[None, None], (height, width, 1))
        top, left = max(0, (height - inner.shape[0]) // 2), max(0, (width - inner.shape[1]) // 2)
        canvas[top : top + inner.shape[0], left : left + inner.shape[1]] = inner
        return canvas
    k = max(k_h, k_w)  # "Crop and Resize": cover, then crop the centre
    outer = _resize_map(detected, max(width, round(old_w * k)), max(height, round(old_h * k)))
    top, left = (outer.shape[0] - height) // 2, (outer.shape[1] - width) // 2
    return outer[top : top + height, left : left + width]


def build_hint(
    unit: ControlNetUnit, width: int, height: int, *, mask: Image.Image | None = None, seed: int = 0
) -> Tensor:
    """The unit's hint [1, 3, height, width] in [0, 1] (the inpaint modules: -1 where the mask repaints)."""
    assert unit.image is not None
    try:
        rgb = np.asarray(to_rgb(unit.image), dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise ParameterError(
            f"the control image cannot be read as RGB ({unit.image.mode}): {error}"
        ) from None
    spec = get_preprocessor(unit.module)
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(unit.image.size, width, height, unit.resize_mode)
    if spec.needs_mask:
        if mask is None:
            raise ParameterError(f"ControlNet module {unit.module!r} needs an inpainting mask (--mask)")
        if mask.size != unit.image.size:
            raise ParameterError(
                f"the inpainting mask is {mask.size[0]}x{mask.size[1]} but the control image is "
                f"{unit.image.size[0]}x{unit.image.size[1]}: give them the same size"
            )
        alpha = np.asarray(mask.convert("L"), dtype=np.uint8)[:, :, None]
        detected = np.concatenate([rgb, alpha], axis=2)
    else:
        detected = run_preprocessor(
            unit.module, rgb, resolution, unit.threshold_a, unit.threshold_b, np.random.default_rng(seed)
        )
    fitted = fit_map(detected, width, height, unit.resize_mode)
    hint = torch.from_numpy(np.array(fitted, copy=True)).float().div_(255).permute(2, 0, 1)[None]
    if hint.shape[1] == 4:  # the inpaint ControlNet's protocol (hook.py): masked pixels become -1
        colour, masked = hint[:, :3], (hint[:, 3:] > 0.5).float()
        hint = colour * (1 - masked) - masked
    return hint


@dataclass(frozen=True)
class ActiveUnit:
    """A unit ready to run in one pass: its network, hint at the pass's size, and scales."""

    network: ControlNet
    hint: Tensor  # [1, 3, H, W] on the model's device and dtype
    scales: tuple[float, ...]
    start: float
    end: float
    cond_only: bool

    def active(self, step: int, steps: int) -> bool:
        fraction = step / steps
        return self.start <= fraction <= self.end


def prepare_units(
    units: Sequence[ControlNetUnit],
    width: int,
    height: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    mask: Image.Image | None = None,
    seed: int = 0,
    hires: bool = False,
    crop: tuple[tuple[int, int], tuple[int, int, int, int]] | None = None,
) -> list[ActiveUnit]:
    """The units of a request at one pass's image size (the hires pass rebuilds them at its size).

    `crop` ((width, height) of the init image, region) is the "Only masked" inpainting region: control images
    of the init image's size are cropped to it, as the extension's `try_crop_image_with_a1111_mask`.
    """
    prepared = []
    for unit in units:
        network, unit_mask = unit.network, mask
        assert network is not None and unit.image is not None
        if crop is not None and unit.image.size == crop[0]:
            unit = replace(unit, image=unit.image.crop(crop[1]))
            unit_mask = None if mask is None else mask.crop(crop[1])
        blocks = len(network.model.zero_convs) + 1
        # hook.py forces soft weights for canny and mlsd in the hires pass ("significantly reduces artifacts")
        soft = unit.control_mode != "Balanced" or (
            hires and ("canny" in unit.module or "mlsd" in unit.module)
        )
        hint = build_hint(unit, width, height, mask=unit_mask, seed=seed).to(device, dtype)
        cond_only = unit.control_mode == "ControlNet is more important" or network.global_average_pooling
        prepared.append(
            ActiveUnit(
                network,
                hint,
                tuple(unit.soft_scales(blocks, soft)),
                unit.guidance_start,
                unit.guidance_end,
                cond_only,
            )
        )
    return prepared


def request_units(
    request: Any,
    width: int,
    height: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    seed: int,
    hires: bool,
    crop: tuple[tuple[int, int], tuple[int, int, int, int]] | None = None,
) -> list[ActiveUnit]:
    """A resolved `GenerationRequest`'s units at one pass's size, with its inpainting mask and "Only masked"
    region (`LatentSource.region`)."""
    mask = request.inpaint.mask if request.inpaint is not None else None
    return prepare_units(
        request.controlnet, width, height, device, dtype, mask=mask, seed=seed, hires=hires, crop=crop
    )


def control_residuals(
    units: Sequence[ActiveUnit], step: int, steps: int, batch: int
) -> Callable[[Tensor, Tensor, Tensor], list[Tensor] | None]:
    """`residuals(x_in, t, context)` of the units active at `step`: the sum over units, or None.

    Rows [0, batch) of a doubled CFG batch are the conditional ones (`concat_cond` stacks cond first).
    """
    active = [u for u in units if u.active(step, steps)]

    def residuals(x_in: Tensor, t: Tensor, context: Tensor) -> list[Tensor] | None:
        total: list[Tensor] | None = None
        for unit in active:
            rows = batch if unit.cond_only and x_in.shape[0] == 2 * batch else x_in.shape[0]
            weight = next(unit.network.model.parameters())  # a ControlNet loaded in another dtype still runs
            inputs = (
                x_in[:rows],
                t.expand(x_in.shape[0])[:rows],
                context[:rows],
                unit.hint.expand(rows, -1, -1, -1),
            )
            outs = unit.network.model(*(v.to(weight.device, weight.dtype) for v in inputs))
            outs = [(r * s).to(x_in.device, x_in.dtype) for r, s in zip(outs, unit.scales, strict=True)]
            if unit.network.global_average_pooling:
                outs = [r.mean(dim=(2, 3), keepdim=True) for r in outs]
            if rows < x_in.shape[0]:  # the unconditional half gets no control
                outs = [
                    torch.cat([r, torch.zeros_like(r).expand(x_in.shape[0] - rows, *r.shape[1:])])
                    for r in outs
                ]
            total = outs if total is None else [a + b for a, b in zip(total, outs, strict=True)]
        return total

    return residuals


def controlled(denoiser: Any, units: Sequence[ActiveUnit], sigmas: Tensor, batch: int) -> Any:
    """`denoise(x, sigma, cond)` that hands the network the residuals of the units active at sigma's step."""
    sigmas = sigmas.detach().float().cpu()
    steps = len(sigmas) - 1

    def denoise(x: Tensor, sigma: Any, cond: Any) -> Tensor:
        step = step_of(sigma, sigmas)
        return denoiser(x, sigma, {**cond, "control": control_residuals(units, step, steps, batch)})

    return denoise
