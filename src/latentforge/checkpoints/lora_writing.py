"""The one writer of kohya-format LoRA files: `lora_unet_<U-Net module>` / `lora_te_<CLIP module>`.

Names as kohya sd-scripts `networks/lora.py` (`create_modules`) makes them: prefix + "." + the module's
name in the U-Net / transformers CLIPTextModel kohya trains, then every "." -> "_". For SD1/SD2 that U-Net
is diffusers' (`down_blocks_0_attentions_0_...`, names from the key map `checkpoints/lora.py` reads with,
`keymap_unet.diffusers_key_map`); for SDXL it is sd-scripts' `SdxlUNet2DConditionModel`, which keeps sgm's
original names (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`, ours too), and the two encoders are
`lora_te1_` (CLIP-L) and `lora_te2_` (bigG, transformers names). Per module: `lora_down.weight` [r, in]
(conv: [r, in, k, k]), `lora_up.weight` [out, r] (conv: [out, r, 1, 1]) and `alpha` (a scalar; the update
is `alpha / r * up @ down`).

Modules are named by original checkpoint module name. Text encoders are named in the transformers layout
our `CLIPTextModel` uses, under the single-file prefix of a transformers-layout encoder (SD1's
`cond_stage_model.transformer.`; SDXL's `conditioner.embedders.0.transformer.` for CLIP-L and
`conditioner.embedders.1.transformer.` for bigG), also for SD2 and bigG, whose files use OpenCLIP's layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from latentforge.checkpoints.keymap_unet import diffusers_key_map
from latentforge.checkpoints.single_file import TEXT_PREFIXES, UNET_PREFIX, sdxl_text_prefix
from latentforge.checkpoints.writing import save_safetensors, tensors_to_save
from latentforge.errors import NonFiniteError, ParameterError
from latentforge.models.families import ModelFamily
from latentforge.models.lora_layers import text_targets, unet_targets
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import UNetModel

TEXT_PREFIX = TEXT_PREFIXES["hf"]  # our text encoder's names are the SD1 (transformers) layout's
SDXL_TEXT_PREFIXES = (sdxl_text_prefix(0, "hf"), sdxl_text_prefix(1, "hf"))  # CLIP-L, bigG
KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"
# sd-scripts' LORA_PREFIX_TEXT_ENCODER1/2 (`networks/lora.py`): SDXL's CLIP-L and bigG
KOHYA_TEXT_1, KOHYA_TEXT_2 = "lora_te1_", "lora_te2_"
# kohya's `ss_base_model_version` of SDXL (`sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`)
SDXL_MODEL_VERSION = "sdxl_base_v1-0"


class LoraFactors(NamedTuple):
    """One module's low-rank update `alpha / r * up @ down` (alpha None: r, i.e. scale 1)."""

    down: torch.Tensor  # [r, in] or [r, in, k, k]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | torch.Tensor | None = None


def component_prefixes(family: ModelFamily) -> dict[str, str]:
    """The original-name prefix of each trainable model component ("unet", "text_encoder", SDXL's
    "text_encoder_2"), as `LoRANetwork.module_names` and `StableDiffusion` name the components."""
    if family.is_refiner:  # sd-scripts trains no refiner LoRA: there is no kohya layout to follow
        raise ParameterError(
            f"{family.name!r} is an SDXL refiner: kohya's LoRA layout covers SDXL base models only"
        )
    if family.is_sdxl:
        return {
            "unet": UNET_PREFIX,
            "text_encoder": SDXL_TEXT_PREFIXES[0],
            "text_encoder_2": SDXL_TEXT_PREFIXES[1],
        }
    return {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX}


def _meta_models(family: ModelFamily) -> dict[str, nn.Module]:
    """Full-size models of every component on `meta` (they cost nothing), by component prefix."""
    prefixes = component_prefixes(family)
    with torch.device("meta"):
        models: dict[str, nn.Module] = {
            prefixes["unet"]: UNetModel(family.unet),
            prefixes["text_encoder"]: CLIPTextModel(family.text_encoder),
        }
        if family.text_encoder_2 is not None:
            models[prefixes["text_encoder_2"]] = CLIPTextModel(family.text_encoder_2)
    return models


def module_shapes(family: ModelFamily) -> dict[str, tuple[int, ...]]:
    """Weight shape of every U-Net and text-encoder module, by original checkpoint module name."""
    shapes = {}
    for prefix, module in _meta_models(family).items():
        for name, parameter in module.named_parameters():
            if name.endswith(".weight"):
                shapes[prefix + name.removesuffix(".weight")] = tuple(parameter.shape)
    return shapes


def kohya_names(family: ModelFamily) -> dict[str, str]:
    """Original module name (`model.diffusion_model.…`, `cond_stage_model.transformer.…`) -> kohya name."""
    names = {}
    prefixes = component_prefixes(family)
    if family.is_sdxl:  # sd-scripts' SDXL U-Net has sgm's module names
        kohya = {"text_encoder": KOHYA_TEXT_1, "text_encoder_2": KOHYA_TEXT_2}
        for name in module_shapes(family):
            if name.startswith(UNET_PREFIX):
                names[name] = KOHYA_UNET + name.removeprefix(UNET_PREFIX).replace(".", "_")
    else:
        kohya = {"text_encoder": KOHYA_TEXT}
        for theirs, ours in diffusers_key_map(family.unet).items():
            if theirs.endswith(".weight"):
                module = theirs.removesuffix(".weight")
                names[UNET_PREFIX + ours.removesuffix(".weight")] = KOHYA_UNET + module.replace(".", "_")
    shapes = module_shapes(family)
    for component, kohya_prefix in kohya.items():
        prefix = prefixes[component]
        for name in shapes:
            if name.startswith(prefix):
                names[name] = kohya_prefix + name.removeprefix(prefix).replace(".", "_")
    return names


def kohya_targets(family: ModelFamily, *, conv: bool = False) -> list[str]:
    """The modules kohya's LoRA network trains (`networks/lora.py`), by original module name.

    Every Linear / conv in a `Transformer2DModel` (our `SpatialTransformer`) and in CLIP's attention and MLP;
    with `conv` (LoCon, kohya's `conv_dim`) also those of `ResnetBlock2D`, `Downsample2D`, `Upsample2D`
    (`models/lora_layers.py` selects the same layers for training).
    """
    unet_kinds = ("attention", "feed_forward", *(("conv",) if conv else ()))
    out = []
    for prefix, model in _meta_models(family).items():
        if prefix == UNET_PREFIX:
            layers = unet_targets(model, unet_kinds)
        else:
            layers = text_targets(model, ("text_attention", "text_mlp"))
        out += [prefix + name for name in layers]
    return out


def original_module_name(name: str) -> str:
    """`name` with its checkpoint prefix: our bare U-Net / (first) text-encoder module names are accepted
    too."""
    if name.startswith((UNET_PREFIX, TEXT_PREFIX, *SDXL_TEXT_PREFIXES)):
        return name
    return (TEXT_PREFIX if name.startswith(("text_model.", "text_projection")) else UNET_PREFIX) + name


def _fits(delta: tuple[int, ...], target: tuple[int, ...]) -> bool:
    def squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:  # a Linear update fits a 1x1 conv and back
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape

    return squeeze(delta) == squeeze(target)


def kohya_state_dict(
    modules: Mapping[str, LoraFactors | tuple[torch.Tensor, torch.Tensor, float | torch.Tensor | None]],
    family: ModelFamily,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """A kohya LoRA file's tensors (factors cast to `dtype`, alpha kept float32), every module checked."""
    names, shapes = kohya_names(family), module_shapes(family)
    tensors: dict[str, torch.Tensor] = {}
    for given, factors in modules.items():
        down, up, alpha = LoraFactors(*factors)
        name = original_module_name(given)
        if name not in names:
            raise ParameterError(
                f"LoRA module {given!r} is no U-Net or text-encoder module of a {family.name!r} model "
                f"(expected names like {UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn1.to_q)"
            )
        rank = down.shape[0]
        if (
            down.ndim not in (2, 4)
            or up.ndim != down.ndim
            or up.shape[1] != rank
            or up.shape[2:]
            not in (
                (),
                (1, 1),
            )
        ):
            raise ParameterError(
                f"LoRA module {given}: down {list(down.shape)} and up {list(up.shape)} are not "
                "[r, in(, k, k)] and [out, r(, 1, 1)]"
            )
        delta = (up.shape[0], *down.shape[1:])
        if not _fits(delta, shapes[name]):
            raise ParameterError(
                f"LoRA module {given}: the update is {list(delta)}, the weight is {list(shapes[name])}"
            )
        for label, tensor in (("down", down), ("up", up)):
            if not torch.isfinite(tensor).all():
                raise NonFiniteError(f"LoRA module {given}: {label} holds NaN or Inf; nothing was written")
        if len(shapes[name]) == 4 and down.ndim == 2:  # a 1x1 conv (SD1's proj_in): kohya writes conv factors
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif len(shapes[name]) == 2 and down.ndim == 4:
            down, up = down.flatten(1), up.flatten(1)
        key = names[name]
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        scale = float(rank if alpha is None else alpha)
        # float32 whatever the factors' dtype: an alpha like 0.1 has no exact fp16 value (kohya casts it)
        tensors[f"{key}.alpha"] = torch.tensor(scale, dtype=torch.float32)
    cast = tensors_to_save({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, dtype)
    return {**tensors, **cast}


def addnet_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash`: SHA-256 of a safetensors serialisation's data section (`train_util`)."""
    data = safetensors_bytes(dict(tensors))
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header :]).hexdigest()


def save_kohya_lora(
    path: str | Path,
    modules: Mapping[str, LoraFactors | tuple[torch.Tensor, torch.Tensor, float | torch.Tensor | None]],
    family: ModelFamily,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `{original module name: (down, up, alpha)}` as a kohya LoRA `.safetensors`, atomically.

    `metadata` (`ss_*` strings, as kohya's trainer writes) is stored as given, plus `sshs_model_hash`, the
    hash A1111 shows as the LoRA's hash (computed as kohya does, so no reader has to hash the file).
    """
    if not modules:
        raise ParameterError("a LoRA file needs at least one module")
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ParameterError(f"LoRA metadata values must be strings (safetensors): {bad[:5]}")
    tensors = tensors_to_save(kohya_state_dict(modules, family, dtype=dtype))
    header = {**(metadata or {}), "sshs_model_hash": addnet_hash(tensors)}
    return save_safetensors(path, tensors, header)


def kohya_metadata(family: ModelFamily, rank: int, alpha: float, **network_args: str) -> dict[str, str]:
    """The `ss_*` fields kohya's `extract_lora_from_models.py` writes (its minimum LoRA metadata)."""
    import json

    v2 = family.text_layout == "openclip" and not family.is_sdxl  # kohya's SDXL files say ss_v2 False
    version = ("sd_v2" if v2 else "sd_v1") + ("_v" if family.prediction == "v" else "")
    if family.is_sdxl:
        version = SDXL_MODEL_VERSION
    return {
        "ss_v2": str(v2),
        "ss_base_model_version": version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(network_args),
    }
