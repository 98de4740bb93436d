"""OpenCLIP text tower (SD 2.x `cond_stage_model.model.*`) <-> our CLIP text encoder keys.

Both directions work on prefix-free state dicts and are exact inverses on the text-tower tensors.
Differences between the layouts: OpenCLIP fuses q, k, v into `attn.in_proj_{weight,bias}` (concatenated
along dim 0, in that order), stores `positional_embedding` as a bare parameter, and stores
`text_projection` as a [width, proj] matrix (x @ P) where ours is a Linear weight [proj, width].

`logit_scale` (CLIP's contrastive temperature) plays no part in text encoding: `openclip_to_ours` drops
it. `ours_to_openclip` writes it back as a constant, ln(100) by default (the value OpenCLIP clamps to
and the one the SD 2.x checkpoints carry), so a saved SD 2.x checkpoint loads strictly into the original
`FrozenOpenCLIPEmbedder`; pass `logit_scale=None` to omit it.
"""

from __future__ import annotations

import math

import torch

from latentforge.checkpoints.reading import StateDict
from latentforge.models.configs import TextEncoderConfig

OPENCLIP_LOGIT_SCALE = math.log(100.0)
OPENCLIP_IGNORED = ("logit_scale", "attn_mask")

# Per-layer modules that are renamed 1:1 (weight and bias): ours -> OpenCLIP.
_LAYER_RENAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("layer_norm2", "ln_2"),
)


def _renamed_keys(config: TextEncoderConfig) -> list[tuple[str, str]]:
    """(ours, OpenCLIP) pairs of the tensors copied unchanged."""
    pairs = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight")]
    for param in ("weight", "bias"):
        pairs.append((f"text_model.final_layer_norm.{param}", f"ln_final.{param}"))
        for n in range(config.layers):
            pairs += [
                (
                    f"text_model.encoder.layers.{n}.{ours}.{param}",
                    f"transformer.resblocks.{n}.{theirs}.{param}",
                )
                for ours, theirs in _LAYER_RENAMES
            ]
    return pairs


def _take(state_dict: StateDict, key: str, direction: str) -> torch.Tensor:
    if key not in state_dict:
        raise KeyError(f"{direction}: missing key {key!r} (state dict has {len(state_dict)} keys)")
    return state_dict[key]


def _check_unexpected(
    state_dict: StateDict, used: set[str], direction: str, ignored: tuple[str, ...]
) -> None:
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignored)
    if unexpected:
        raise ValueError(f"{direction}: unexpected keys {unexpected[:10]} ({len(unexpected)} in total)")


def openclip_to_ours(state_dict: StateDict, config: TextEncoderConfig) -> StateDict:
    """Convert an OpenCLIP text tower (prefix stripped) to `CLIPTextModel` keys; drops `logit_scale`."""
    direction = "openclip_to_ours"
    out: StateDict = {}
    used: set[str] = set()
    for ours, theirs in _renamed_keys(config):
        out[ours] = _take(state_dict, theirs, direction)
        used.add(theirs)
    out["text_model.embeddings.position_embedding.weight"] = _take(
        state_dict, "positional_embedding", direction
    )
    used.add("positional_embedding")
    for n in range(config.layers):
        for param in ("weight", "bias"):
            key = f"transformer.resblocks.{n}.attn.in_proj_{param}"
            fused = _take(state_dict, key, direction)  # [3*width, ...]: q, k, v stacked
            for name, part in zip("qkv", fused.chunk(3, dim=0), strict=True):
                # cloned so that the three tensors do not share storage (safetensors refuses that)
                out[f"text_model.encoder.layers.{n}.self_attn.{name}_proj.{param}"] = part.clone()
            used.add(key)
    if config.projection_dim is not None:
        out["text_projection.weight"] = _take(state_dict, "text_projection", direction).t().contiguous()
        used.add("text_projection")
    _check_unexpected(state_dict, used, direction, OPENCLIP_IGNORED)
    return out


def ours_to_openclip(
    state_dict: StateDict, config: TextEncoderConfig, *, logit_scale: float | None = OPENCLIP_LOGIT_SCALE
) -> StateDict:
    """Convert `CLIPTextModel` keys to the OpenCLIP text-tower layout (the inverse of `openclip_to_ours`)."""
    direction = "ours_to_openclip"
    out: StateDict = {}
    used: set[str] = set()
    for ours, theirs in _renamed_keys(config):
        out[theirs] = _take(state_dict, ours, direction)
        used.add(ours)
    position_key = "text_model.embeddings.position_embedding.weight"
    out["positional_embedding"] = _take(state_dict, position_key, direction)
    used.add(position_key)
    for n in range(config.layers):
        for param in ("weight", "bias"):
            keys = [f"text_model.encoder.layers.{n}.self_attn.{p}_proj.{param}" for p in "qkv"]
            out[f"transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat(
                [_take(state_dict, k, direction) for k in keys], dim=0
            )  # 3 x [width, ...] -> [3*width, ...]
            used.update(keys)
    if config.projection_dim is not None:
        out["text_projection"] = _take(state_dict, "text_projection.weight", direction).t().contiguous()
        used.add("text_projection.weight")
    _check_unexpected(state_dict, used, direction, ())
    if logit_scale is not None:
        reference = out["positional_embedding"]
        out["logit_scale"] = torch.tensor(logit_scale, dtype=reference.dtype, device=reference.device)
    return out
