"""diffusers folder layouts (`unet/`, `vae/`, `text_encoder/` with `config.json`) -> our bundle.

The component configs are translated once from diffusers' `config.json` files; the family is the
table entry with exactly those configs, or a `custom` family when none matches (a tiny test model,
or SD 2.x as diffusers ships it: a 23-layer text encoder that already is the penultimate layer).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.checkpoints.errors import CheckpointNotFoundError, UnknownArchitectureError
from latentforge.checkpoints.reading import StateDict, read_state_dict
from latentforge.model import StableDiffusion
from latentforge.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from latentforge.models.families import FAMILIES, TINY, ModelFamily, Prediction

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
PREDICTIONS: dict[str, Prediction] = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    widths = list(cfg["block_out_channels"])
    levels = [i for i, kind in enumerate(cfg["down_block_types"]) if kind.startswith("CrossAttn")]
    # diffusers' `attention_head_dim` historically holds the head *count* (an int for SD 1.x,
    # a per-level list for SD 2.x); `num_attention_heads`, when set, is the count.
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    head_widths = {widths[i] // heads[i] for i in levels}
    depth = cfg.get("transformer_layers_per_block", 1)
    if len(set(heads[i] for i in levels)) == 1:
        num_heads, head_dim = heads[levels[0]], None
    elif len(head_widths) == 1:
        num_heads, head_dim = None, head_widths.pop()
    else:
        raise ValueError(f"unsupported per-level attention heads {heads}")
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        attention_levels=tuple(levels),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth if isinstance(depth, int) else depth[0],
        context_dim=cfg["cross_attention_dim"],
        use_linear_proj=bool(cfg.get("use_linear_projection", False)),
        norm_groups=cfg.get("norm_num_groups", 32),
    )


def vae_config_from_diffusers(cfg: dict[str, Any]) -> VAEConfig:
    widths = list(cfg["block_out_channels"])
    return VAEConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        z_channels=cfg["latent_channels"],
        embed_dim=cfg["latent_channels"],
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        norm_groups=cfg.get("norm_num_groups", 32),
    )


def text_config_from_diffusers(cfg: dict[str, Any], pad_token: int) -> TextEncoderConfig:
    with_projection = "CLIPTextModelWithProjection" in cfg.get("architectures", [])
    return TextEncoderConfig(
        vocab_size=cfg["vocab_size"],
        max_length=cfg["max_position_embeddings"],
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        mlp_width=cfg["intermediate_size"],
        activation=cfg["hidden_act"],
        projection_dim=cfg["projection_dim"] if with_projection else None,
        pad_token=pad_token,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(path, "missing from the diffusers folder")
    return json.loads(path.read_text())


def _read_weights(folder: Path) -> StateDict:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)[0]
    raise CheckpointNotFoundError(folder, f"no weights file ({', '.join(WEIGHT_FILES)})")


def _pad_token(root: Path) -> int:
    """OpenCLIP-style tokenizers (SD 2.x) pad with "!" (id 0), CLIP's with <|endoftext|>."""
    special = root / "tokenizer" / "special_tokens_map.json"
    if special.is_file():
        pad = json.loads(special.read_text()).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad == "!":
            return 0
    return 49407


def family_from_diffusers(root: Path, prediction: Prediction | None = None) -> ModelFamily:
    unet = unet_config_from_diffusers(_read_json(root / "unet" / "config.json"))
    vae_json = _read_json(root / "vae" / "config.json")
    vae = vae_config_from_diffusers(vae_json)
    text = text_config_from_diffusers(_read_json(root / "text_encoder" / "config.json"), _pad_token(root))
    scheduler = root / "scheduler" / "scheduler_config.json"
    if prediction is None and scheduler.is_file():
        prediction = PREDICTIONS.get(json.loads(scheduler.read_text()).get("prediction_type", "epsilon"))
    for family in FAMILIES.values():
        if (family.unet, family.vae, family.text_encoder) == (unet, vae, text):
            return family if prediction is None else family.with_prediction(prediction)
    f = 2 ** (len(vae.ch_mult) - 1)
    size = _read_json(root / "unet" / "config.json").get("sample_size", TINY.default_size // f) * f
    return replace(
        TINY,
        name="custom",
        unet=unet,
        vae=vae,
        text_encoder=text,
        prediction=prediction or "epsilon",
        latent_scale=vae_json.get("scaling_factor", 0.18215),
        text_layout="openclip" if text.pad_token == 0 else "hf",
        default_size=size,
    )


def load_diffusers_folder(
    root: Path, *, dtype: torch.dtype, prediction: Prediction | None = None
) -> StableDiffusion:
    from latentforge.checkpoints.loading import assemble

    if not (root / "unet").is_dir():
        raise UnknownArchitectureError(root, "a folder, but not a diffusers model (no unet/ subfolder)")
    family = family_from_diffusers(root, prediction)
    unet = keymap_unet.diffusers_to_ours(_read_weights(root / "unet"), family.unet)
    vae = keymap_vae.diffusers_to_ours(_read_weights(root / "vae"), family.vae)
    text = _read_weights(root / "text_encoder")
    text = {k: v for k, v in text.items() if not k.endswith("position_ids")}
    bundle = assemble(family, unet, vae, text, dtype=dtype, path=root)
    bundle.name = root.name
    return bundle
