"""Original single-file SD checkpoints: split into components, detect the family, load, save.

Layout (CompVis/Stability `LatentDiffusion`): `model.diffusion_model.*` (U-Net), `first_stage_model.*`
(VAE), `cond_stage_model.transformer.*` (SD1, transformers layout) or `cond_stage_model.model.*`
(SD2, OpenCLIP layout); SDXL (Stability `sgm`) has `conditioner.embedders.N.transformer.*` /
`.model.*` instead (base: 0 = CLIP ViT-L, 1 = OpenCLIP bigG; refiner: 0 = bigG).
EMA weights (`model_ema.*`, dots removed from the names) and the diffusion
buffers (`betas`, `alphas_cumprod`, ...) are ignored unless `use_ema=True`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from latentforge.checkpoints import keymap_text
from latentforge.checkpoints.errors import CorruptCheckpointError, UnknownArchitectureError
from latentforge.checkpoints.metadata import METADATA_FAMILY
from latentforge.checkpoints.reading import StateDict
from latentforge.checkpoints.writing import save_safetensors
from latentforge.models.configs import TextEncoderConfig, UNetConfig, VAEConfig, config_from_dict
from latentforge.models.families import FAMILIES, ModelFamily

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"hf": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
EMA_PREFIX = "model_ema."
SDXL_TEXT_PREFIX = "conditioner.embedders."
SDXL_TEXT_LAYOUTS = {"transformer.": "hf", "model.": "openclip"}

# Training-time buffers of LatentDiffusion and keys older exporters left behind: never weights.
IGNORED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    }
)
IGNORED_PREFIXES = ("first_stage_model.loss.",)


class MissingEMAError(KeyError):
    """`use_ema` on a checkpoint without (complete) EMA weights; `loading` adds the file name."""


def is_weight_key(key: str, *, use_ema: bool = False) -> bool:
    """False for training buffers and (unless `use_ema`) EMA copies: those need not even be read."""
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
        return False
    return use_ema or not key.startswith(EMA_PREFIX)


def split_components(state_dict: Mapping[str, torch.Tensor], *, use_ema: bool = False) -> dict[str, Any]:
    """Split an original-layout state dict into {"unet", "vae", "text_encoder", "text_layout", "rest"}
    (SDXL: also "text_encoder_2", "text_layout_2")."""
    parts: dict[str, Any] = {
        "unet": {},
        "vae": {},
        "text_encoder": {},
        "text_layout": None,
        "text_encoder_2": {},
        "text_layout_2": None,
        "rest": [],
    }
    for key, tensor in state_dict.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.startswith(EMA_PREFIX):
            continue
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX) :]] = tensor
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX) :]] = tensor
        elif key.startswith(TEXT_PREFIXES["hf"]):
            name = key[len(TEXT_PREFIXES["hf"]) :]
            # Exports made with transformers < 4.21 lack the `text_model.` level.
            parts["text_encoder"][name if name.startswith("text_model.") else f"text_model.{name}"] = tensor
            parts["text_layout"] = "hf"
        elif key.startswith(TEXT_PREFIXES["openclip"]):
            parts["text_encoder"][key[len(TEXT_PREFIXES["openclip"]) :]] = tensor
            parts["text_layout"] = "openclip"
        elif key.startswith(SDXL_TEXT_PREFIX) and _split_sdxl_text(parts, key, tensor):
            pass
        else:
            parts["rest"].append(key)
    if use_ema:
        parts["unet"] = _ema_unet(state_dict, parts["unet"])
    return parts


def _split_sdxl_text(parts: dict[str, Any], key: str, tensor: torch.Tensor) -> bool:
    """`conditioner.embedders.N.{transformer,model}.rest` -> text encoder N + 1 (False: not a text key)."""
    index, _, rest = key[len(SDXL_TEXT_PREFIX) :].partition(".")
    suffix = "" if index == "0" else "_2" if index == "1" else None
    layout = next((v for k, v in SDXL_TEXT_LAYOUTS.items() if rest.startswith(k)), None)
    if suffix is None or layout is None:
        return False
    name = rest.partition(".")[2]
    if layout == "hf" and not name.startswith("text_model."):
        name = f"text_model.{name}"
    parts[f"text_encoder{suffix}"][name] = tensor
    parts[f"text_layout{suffix}"] = layout
    parts["sgm"] = True
    return True


def _ema_unet(state_dict: Mapping[str, torch.Tensor], unet: StateDict) -> StateDict:
    """LDM stores EMA weights as `model_ema.diffusion_model<key without dots>`."""
    ema_names = {EMA_PREFIX + ("diffusion_model." + key).replace(".", ""): key for key in unet}
    found = {key: state_dict[name] for name, key in ema_names.items() if name in state_dict}
    if len(found) != len(unet):
        raise MissingEMAError(f"use_ema: EMA weights exist for {len(found)} of {len(unet)} U-Net tensors")
    return found


def detect_families(
    parts: Mapping[str, Any], metadata: Mapping[str, str], path: str | Path
) -> list[ModelFamily]:
    """The table entries the weights fit: our own metadata's family if present, else every family whose
    U-Net shapes and text layout match (several only when they differ in what shapes cannot show, the
    prediction type: sd2 / sd2-v; `loading` probes the U-Net to choose)."""
    if METADATA_FAMILY in metadata:
        try:
            return [family_from_json(metadata[METADATA_FAMILY])]
        except (ValueError, TypeError, KeyError) as e:
            detail = f"missing {e.args[0]!r}" if isinstance(e, KeyError) else str(e)[:200]
            raise CorruptCheckpointError(
                path, f"unreadable {METADATA_FAMILY!r} metadata ({detail})"
            ) from None
    unet = parts["unet"]
    # the first input block with a transformer: 1 for SD 1.x/2.x, 4 for SDXL (no attention at level 0)
    first = next((i for i in range(1, 13) if f"input_blocks.{i}.1.proj_in.weight" in unet), 1)
    try:
        found = {
            "in_channels": unet["input_blocks.0.0.weight"].shape[1],
            "model_channels": unet["input_blocks.0.0.weight"].shape[0],
            "context_dim": unet[f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            "use_linear_proj": unet[f"input_blocks.{first}.1.proj_in.weight"].ndim == 2,
            "adm_in_channels": unet["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in unet else 0,
        }
    except KeyError as e:
        components = [c for c in ("unet", "vae", "text_encoder") if parts[c]]
        raise UnknownArchitectureError(
            path,
            f"not an SD 1.x/2.x/XL checkpoint (no {e.args[0]!r} in the U-Net); "
            f"components found: {components or 'none'}; other keys: {parts['rest'][:5]}",
        ) from None
    if not parts.get("sgm") and parts.get("text_layout") is None and "label_emb.0.0.weight" in unet:
        # an SDXL U-Net whose text encoders are missing: say which keys the file should have
        raise UnknownArchitectureError(
            path,
            "an SDXL U-Net without its text encoders (no conditioner.embedders.* keys); load a full "
            "SDXL checkpoint, or a diffusers folder with text_encoder/ and text_encoder_2/",
        )
    matches = [
        family
        for family in FAMILIES.values()
        if family.text_layout == parts["text_layout"]
        and family.is_sdxl == bool(parts.get("sgm"))
        and (family.text_encoder_2 is None) == (not parts.get("text_encoder_2"))
        and all(getattr(family.unet, k) == v for k, v in found.items())
    ]
    if not matches:
        raise UnknownArchitectureError(
            path,
            f"no model family matches U-Net {found} with text encoder layout {parts['text_layout']!r}"
            f"{' and a second text encoder' if parts.get('text_encoder_2') else ''}; "
            f"known families: {', '.join(FAMILIES)}",
        )
    return matches


def family_to_json(family: ModelFamily) -> str:
    return json.dumps(dataclasses.asdict(family), sort_keys=True)


def family_from_json(text: str) -> ModelFamily:
    """Rebuild a family saved by `family_to_json`; a table entry when it equals one."""
    data = json.loads(text)
    data["unet"] = config_from_dict(UNetConfig, data["unet"])
    data["vae"] = config_from_dict(VAEConfig, data["vae"])
    data["text_encoder"] = config_from_dict(TextEncoderConfig, data["text_encoder"])
    if data.get("text_encoder_2") is not None:
        data["text_encoder_2"] = config_from_dict(TextEncoderConfig, data["text_encoder_2"])
    data["vector_inputs"] = tuple(data.get("vector_inputs", ()))
    family = ModelFamily(**data)
    return FAMILIES.get(family.name) if FAMILIES.get(family.name) == family else family  # type: ignore[return-value]


def text_encoder_from_single_file(text_sd: StateDict, layout: str, config: TextEncoderConfig) -> StateDict:
    return keymap_text.openclip_to_ours(text_sd, config) if layout == "openclip" else text_sd


def sdxl_text_prefix(index: int, layout: str) -> str:
    """`conditioner.embedders.N.transformer.` (hf) or `.model.` (openclip)."""
    return f"{SDXL_TEXT_PREFIX}{index}.{'transformer' if layout == 'hf' else 'model'}."


def to_single_file_state_dict(
    unet: StateDict,
    vae: StateDict,
    text_encoder: StateDict,
    family: ModelFamily,
    text_encoder_2: StateDict | None = None,
) -> StateDict:
    """Our component state dicts -> the original single-file layout of the family."""
    if family.text_layout == "openclip":
        text_encoder = keymap_text.ours_to_openclip(text_encoder, family.text_encoder)
    texts = [(TEXT_PREFIXES[family.text_layout], text_encoder)]
    if family.is_sdxl:
        texts = [(sdxl_text_prefix(0, family.text_layout), text_encoder)]
        if family.text_encoder_2 is not None:
            if text_encoder_2 is None:
                raise ValueError(f"family {family.name} has a second text encoder: pass text_encoder_2")
            # sgm's FrozenOpenCLIPEmbedder2 keeps open_clip's logit_scale: written so sgm loads strictly
            g = keymap_text.ours_to_openclip(text_encoder_2, family.text_encoder_2)
            texts.append((sdxl_text_prefix(1, "openclip"), g))
    out: StateDict = {}
    for prefix, sd in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), *texts):
        out.update({prefix + k: v for k, v in sd.items()})
    return out


def save_single_file(
    path: str | Path,
    unet: StateDict,
    vae: StateDict,
    text_encoder: StateDict,
    family: ModelFamily,
    *,
    dtype: torch.dtype | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    text_encoder_2: StateDict | None = None,
) -> None:
    """Write an original-layout `.safetensors` with the family in its metadata (atomic rename)."""
    tensors = to_single_file_state_dict(unet, vae, text_encoder, family, text_encoder_2)
    metadata = {METADATA_FAMILY: family_to_json(family), **(extra_metadata or {})}
    save_safetensors(path, tensors, metadata, dtype=dtype)
