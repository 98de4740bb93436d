"""Our own component files: the VAE, CLIP and text-encoder exports of `latentforge train`.

Each is a `.safetensors` with bare module keys and the component's config as JSON in the metadata
(`metadata.py`), so it loads without flags. The U-Net is exported as an original-layout single file
(`single_file.save_single_file`, family in `METADATA_FAMILY`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch

from latentforge.checkpoints import keymap_vae
from latentforge.checkpoints.assembly import load_into
from latentforge.checkpoints.errors import CorruptCheckpointError, ExportError
from latentforge.checkpoints.keymap_clip import openclip_to_ours
from latentforge.checkpoints.metadata import (
    METADATA_CLIP_CONFIG,
    METADATA_COMPONENT,
    METADATA_TEXT_CONFIG,
    METADATA_TEXT_TOWER_FROM,
    METADATA_VAE_CONFIG,
)
from latentforge.checkpoints.reading import StateDict, read_state_dict
from latentforge.checkpoints.single_file import EMA_PREFIX, IGNORED_PREFIXES, TEXT_PREFIXES, VAE_PREFIX
from latentforge.checkpoints.writing import save_safetensors, tensors_to_save
from latentforge.models.clip import CLIPConfig, CLIPModel, clip_config_from_json, clip_config_to_json
from latentforge.models.configs import TextEncoderConfig, VAEConfig, config_from_dict, config_to_json
from latentforge.models.families import TINY, ModelFamily
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.vae import AutoencoderKL

_TEXT_TOWER = "text.text_model."
T = TypeVar("T")


def _config(path: str | Path, metadata: dict[str, str], key: str, parse: Callable[[str], T]) -> T:
    """A config stored as JSON in the file's metadata; a broken one is an error naming file and key."""
    try:
        return parse(metadata[key])
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise CorruptCheckpointError(path, f"unreadable {key!r} metadata ({str(e)[:200]})") from None


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------


def read_vae_state_dict(path: str | Path, family: ModelFamily) -> StateDict:
    """A standalone VAE in the original layout (bare or `first_stage_model.`-prefixed) or diffusers', or the
    first stage of a whole single-file checkpoint (its `first_stage_model.` keys, as diffusers'
    `AutoencoderKL.from_single_file` reads one): "the VAE of that model"."""
    state_dict, _ = read_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in state_dict):
        state_dict = {k[len(VAE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not k.startswith(EMA_PREFIX) and not k.startswith(IGNORED_PREFIXES) and not k.startswith("loss.")
    }
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state_dict):
        state_dict = keymap_vae.diffusers_to_ours(state_dict, family.vae)
    return state_dict


def load_vae(path: str | Path, config: VAEConfig | None = None) -> AutoencoderKL:
    """A standalone VAE file (our export: config in metadata; else `config` is needed) as an AutoencoderKL."""
    _, metadata = read_state_dict(path)
    if config is None:
        if METADATA_VAE_CONFIG not in metadata:
            raise ExportError(
                path,
                f"no {METADATA_VAE_CONFIG!r} metadata (not exported by `latentforge train vae`); "
                "give its VAEConfig explicitly (task option `vae_config`)",
            )
        config = _config(
            path, metadata, METADATA_VAE_CONFIG, lambda text: config_from_dict(VAEConfig, json.loads(text))
        )
    state_dict = read_vae_state_dict(path, replace(TINY, vae=config))
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    load_into(vae, state_dict, component="vae", family="custom", path=path)
    return vae


def save_vae(vae: AutoencoderKL, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Bare original-layout keys (`encoder.down.0...`, no `first_stage_model.`), the config in metadata."""
    metadata = {METADATA_VAE_CONFIG: config_to_json(vae.config), METADATA_COMPONENT: "vae"}
    save_safetensors(path, vae.state_dict(), metadata, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# CLIP and its text tower
# --------------------------------------------------------------------------------------------------


def text_encoder_path(path: str | Path) -> Path:
    """Where `train clip` puts the text tower: `final.safetensors` -> `final.text_encoder.safetensors`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.text_encoder{path.suffix}")


def save_clip(clip: CLIPModel, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """CLIPModel keys (`visual.*`, `text.*`, `logit_scale`) with the CLIPConfig in the metadata."""
    metadata = {METADATA_CLIP_CONFIG: clip_config_to_json(clip.config), METADATA_COMPONENT: "clip"}
    save_safetensors(path, clip.state_dict(), metadata, dtype=dtype)


def save_text_encoder(text: CLIPTextModel, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """The text tower alone in CLIPTextModel keys (`text_model.*`, `text_projection.*`) plus its config."""
    metadata = {METADATA_TEXT_CONFIG: config_to_json(text.config), METADATA_COMPONENT: "text_encoder"}
    save_safetensors(path, text.state_dict(), metadata, dtype=dtype)


def save_clip_sharing_text(
    clip: CLIPModel, path: str | Path, checkpoint: str | Path, dtype: torch.dtype
) -> None:
    """Save `clip` without its text transformer, which `load_clip` then reads from the SD single file
    `checkpoint` (kept in the same folder); raises ExportError unless that file holds the same weights."""
    path, checkpoint = Path(path), Path(checkpoint)
    if path.resolve().parent != checkpoint.resolve().parent:
        raise ExportError(checkpoint, f"must sit in the same folder as {path}")
    tensors = tensors_to_save(clip.state_dict(), dtype)
    shared = _text_tower_of(checkpoint)
    ours = {k: v for k, v in tensors.items() if k.startswith(_TEXT_TOWER)}
    differing = [k for k, v in ours.items() if k not in shared or not torch.equal(shared[k], v)]
    if differing or len(shared) != len(ours):
        raise ExportError(
            checkpoint, f"its text encoder is not this CLIP's text tower (e.g. {differing[:3]})"
        )
    metadata = {
        METADATA_CLIP_CONFIG: clip_config_to_json(clip.config),
        METADATA_COMPONENT: "clip",
        METADATA_TEXT_TOWER_FROM: checkpoint.name,
    }
    save_safetensors(path, {k: v for k, v in tensors.items() if k not in ours}, metadata)


def _text_tower_of(checkpoint: Path) -> StateDict:
    """The text transformer of an SD single file in CLIPModel keys (`text.text_model.*`)."""
    prefix = TEXT_PREFIXES["hf"] + "text_model."
    state_dict, _ = read_state_dict(checkpoint)
    return {
        _TEXT_TOWER + k.removeprefix(prefix): v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k.endswith("position_ids")
    }


def load_clip(path: str | Path, config: CLIPConfig | None = None) -> CLIPModel:
    """A CLIP file: our export (config from its metadata), or an open_clip-layout file with `config` given."""
    state_dict, metadata = read_state_dict(path)
    if METADATA_TEXT_TOWER_FROM in metadata:
        state_dict.update(_text_tower_of(Path(path).with_name(metadata[METADATA_TEXT_TOWER_FROM])))
    if config is None:
        if METADATA_CLIP_CONFIG not in metadata:
            raise ExportError(
                path,
                f"no {METADATA_CLIP_CONFIG!r} metadata (not a `latentforge train clip` export); "
                "pass its CLIPConfig explicitly (task option `clip`)",
            )
        config = _config(path, metadata, METADATA_CLIP_CONFIG, clip_config_from_json)
    if "token_embedding.weight" in state_dict:  # open_clip / OpenAI layout
        state_dict = openclip_to_ours(state_dict, config)
    with torch.device("meta"):
        clip = CLIPModel(config)
    load_into(clip, state_dict, component="clip", family="custom", path=path)
    return clip


def load_text_encoder(path: str | Path, config: TextEncoderConfig | None = None) -> CLIPTextModel:
    """A text tower: a text-encoder export (keys bare or under `cond_stage_model.transformer.`), or the
    `text.*` part of a whole CLIP export; `config` is needed only when the file's metadata has none."""
    state_dict, metadata = read_state_dict(path)
    if METADATA_CLIP_CONFIG in metadata and METADATA_TEXT_CONFIG not in metadata:
        config = config or _config(path, metadata, METADATA_CLIP_CONFIG, clip_config_from_json).text
        state_dict = {k.removeprefix("text."): v for k, v in state_dict.items() if k.startswith("text.")}
    elif config is None and METADATA_TEXT_CONFIG in metadata:
        config = _config(
            path,
            metadata,
            METADATA_TEXT_CONFIG,
            lambda text: config_from_dict(TextEncoderConfig, json.loads(text)),
        )
    elif config is None:
        raise ExportError(
            path,
            f"neither {METADATA_TEXT_CONFIG!r} nor {METADATA_CLIP_CONFIG!r} metadata (it was not exported by "
            "`latentforge train clip`): give its TextEncoderConfig explicitly (the U-Net task option "
            "`text_encoder_config`)",
        )
    prefix = TEXT_PREFIXES["hf"]
    state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        text = CLIPTextModel(config)
    load_into(text, state_dict, component="text encoder", family="custom", path=path)
    return text
