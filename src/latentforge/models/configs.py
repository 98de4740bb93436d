"""Frozen config dataclasses: the one constructor argument of each network.

Architecture numbers for real model families live in `families.py`, not here; the defaults
below are deliberately tiny so that a bare `UNetConfig()` is a cheap test model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Activation = Literal["quick_gelu", "gelu"]


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (causal, pre-LayerNorm)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 32
    layers: int = 2
    heads: int = 2
    mlp_width: int = 128
    activation: Activation = "quick_gelu"
    projection_dim: int | None = None  # text_projection (pooled output), None = absent
    pad_token: int = 49407  # SD1 pads with <|endoftext|>, OpenCLIP (SD2) with 0


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (LDM `first_stage_model`); downsampling factor f = 2 ** (len(ch_mult) - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    norm_groups: int = 32

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """LDM U-Net (`model.diffusion_model`): ResBlocks with time embedding and spatial transformers.

    `attention_levels` lists the resolution levels (0 = full latent size) that carry a
    SpatialTransformer; the original config calls these `attention_resolutions` (1, 2, 4 -> 0, 1, 2).
    Heads are given either as a count (`num_heads`, SD 1.x) or as a width (`head_dim`, SD 2.x).
    `level_depths` gives a transformer depth per level (SDXL's (0, 2, 10); the middle block takes the last
    level's, as sgm's `transformer_depth_middle`); empty means `transformer_depth` everywhere.
    `adm_in_channels` > 0 adds sgm's `label_emb` (SDXL's `vector`: pooled text plus numbers, each through
    `vector_embed_dim` Fourier features) to the time embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (0, 1)
    num_heads: int | None = 2
    head_dim: int | None = None
    transformer_depth: int = 1
    context_dim: int = 32
    use_linear_proj: bool = False
    norm_groups: int = 32
    level_depths: tuple[int, ...] = ()
    adm_in_channels: int = 0
    vector_embed_dim: int = 0

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at a level (the middle block: the last level)."""
        return self.level_depths[level] if self.level_depths else self.transformer_depth

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of the attention layers at a given channel width."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None, "UNetConfig needs num_heads or head_dim"
        return self.num_heads, channels // self.num_heads


ConfigT = TypeVar("ConfigT", TextEncoderConfig, VAEConfig, UNetConfig)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """Rebuild a config from `config_to_dict` output (JSON turns tuples into lists)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def config_to_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)
