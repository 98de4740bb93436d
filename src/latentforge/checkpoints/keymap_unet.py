"""diffusers `UNet2DConditionModel` <-> original LDM U-Net keys (ours), generated from the config.

The original numbers blocks flatly (`input_blocks.N`, `output_blocks.N`); diffusers groups them by
level (`down_blocks.L.resnets.J`, `up_blocks.I.attentions.J`, with up blocks in execution order).
Inside a ResBlock six leaves are renamed; inside a transformer nothing is. Tensors are unchanged
except `proj_in`/`proj_out`, which are coerced to the config's form (1x1 conv [C, C, 1, 1] or Linear
[C, C]) so a state dict saved with the other projection form still loads. Both directions are inverses.
"""

from __future__ import annotations

import torch

from latentforge.checkpoints.reading import StateDict
from latentforge.models.configs import UNetConfig

# (ours, diffusers) leaf modules of a ResBlock; the shortcut exists only when the width changes.
_RESBLOCK_LEAVES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
_SHORTCUT = ("skip_connection", "conv_shortcut")
_TRANSFORMER_LEAVES = ("norm", "proj_in", "proj_out")
_BLOCK_LEAVES = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")
_BIASLESS_LEAVES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")
_OUTER = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
_PROJECTIONS = ("proj_in.weight", "proj_out.weight")


def _params(theirs: str, ours: str, names: tuple[str, ...] = ("weight", "bias")) -> list[tuple[str, str]]:
    return [(f"{theirs}.{name}", f"{ours}.{name}") for name in names]


def _resblock(theirs: str, ours: str, shortcut: bool) -> list[tuple[str, str]]:
    leaves = (*_RESBLOCK_LEAVES, _SHORTCUT) if shortcut else _RESBLOCK_LEAVES
    return [pair for a, b in leaves for pair in _params(f"{theirs}.{b}", f"{ours}.{a}")]


def _transformer(theirs: str, ours: str, depth: int) -> list[tuple[str, str]]:
    pairs = [pair for leaf in _TRANSFORMER_LEAVES for pair in _params(f"{theirs}.{leaf}", f"{ours}.{leaf}")]
    for n in range(depth):
        block = f"transformer_blocks.{n}"
        for leaf in _BLOCK_LEAVES:
            pairs += _params(f"{theirs}.{block}.{leaf}", f"{ours}.{block}.{leaf}")
        for leaf in _BIASLESS_LEAVES:
            pairs += _params(f"{theirs}.{block}.{leaf}", f"{ours}.{block}.{leaf}", ("weight",))
    return pairs


def diffusers_key_map(config: UNetConfig) -> dict[str, str]:
    """Every parameter key of a diffusers `UNet2DConditionModel` of this config -> our key."""
    base, blocks = config.model_channels, config.num_res_blocks
    widths = [base * m for m in config.channel_mult]
    attention = set(config.attention_levels)
    pairs = _params("time_embedding.linear_1", "time_embed.0") + _params(
        "time_embedding.linear_2", "time_embed.2"
    )
    if config.adm_in_channels:  # SDXL's `vector` MLP: diffusers' text_time add_embedding
        pairs += _params("add_embedding.linear_1", "label_emb.0.0") + _params(
            "add_embedding.linear_2", "label_emb.0.2"
        )
    pairs += (
        _params("conv_in", "input_blocks.0.0")
        + _params("conv_norm_out", "out.0")
        + _params("conv_out", "out.2")
    )

    channels, skip_widths, index = base, [base], 1
    for level, width in enumerate(widths):
        for j in range(blocks):
            theirs = f"down_blocks.{level}"
            pairs += _resblock(f"{theirs}.resnets.{j}", f"input_blocks.{index}.0", channels != width)
            if level in attention:
                pairs += _transformer(
                    f"{theirs}.attentions.{j}", f"input_blocks.{index}.1", config.depth_at(level)
                )
            channels = width
            skip_widths.append(channels)
            index += 1
        if level != len(widths) - 1:
            pairs += _params(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op")
            skip_widths.append(channels)
            index += 1

    pairs += _resblock("mid_block.resnets.0", "middle_block.0", False)
    pairs += _transformer("mid_block.attentions.0", "middle_block.1", config.depth_at(len(widths) - 1))
    pairs += _resblock("mid_block.resnets.1", "middle_block.2", False)

    for i, level in enumerate(reversed(range(len(widths)))):
        theirs = f"up_blocks.{i}"
        for j in range(blocks + 1):
            ours = f"output_blocks.{i * (blocks + 1) + j}"
            in_channels = channels + skip_widths.pop()
            channels = widths[level]
            pairs += _resblock(f"{theirs}.resnets.{j}", f"{ours}.0", in_channels != channels)
            if level in attention:
                pairs += _transformer(f"{theirs}.attentions.{j}", f"{ours}.1", config.depth_at(level))
        if level:
            # `ours` is the level's last output block; the upsampler follows its ResBlock [+ transformer]
            pairs += _params(f"{theirs}.upsamplers.0.conv", f"{ours}.{2 if level in attention else 1}.conv")
    return dict(pairs)


def _fit_projection(key: str, tensor: torch.Tensor, linear: bool) -> torch.Tensor:
    if not key.endswith(_PROJECTIONS):
        return tensor
    if linear and tensor.ndim == 4:
        return tensor[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
    if not linear and tensor.ndim == 2:
        return tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
    return tensor


def _convert(state_dict: StateDict, names: dict[str, str], config: UNetConfig, direction: str) -> StateDict:
    unknown = sorted(key for key in state_dict if key not in names)
    if unknown:
        raise ValueError(
            f"{direction}: {len(unknown)} keys have no counterpart in a U-Net of {config}: {unknown[:10]}"
        )
    return {names[k]: _fit_projection(k, v, config.use_linear_proj) for k, v in state_dict.items()}


def diffusers_to_ours(state_dict: StateDict, config: UNetConfig) -> StateDict:
    """Convert a diffusers `UNet2DConditionModel` state dict to our (original LDM) keys."""
    return _convert(state_dict, diffusers_key_map(config), config, "diffusers_to_ours")


def ours_to_diffusers(state_dict: StateDict, config: UNetConfig) -> StateDict:
    """Convert our (original LDM) U-Net keys to a diffusers `UNet2DConditionModel` state dict."""
    names = {ours: theirs for theirs, ours in diffusers_key_map(config).items()}
    return _convert(state_dict, names, config, "ours_to_diffusers")


def diffusers_config(config: UNetConfig) -> dict[str, object]:
    """`UNet2DConditionModel` keyword arguments for this config (inverse of `unet_config_from_diffusers`)."""
    widths = [config.model_channels * m for m in config.channel_mult]
    levels = range(len(widths))
    attention = set(config.attention_levels)
    down = tuple("CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in levels)
    up = tuple("CrossAttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(levels))
    depths = tuple(config.depth_at(level) for level in levels)
    vector: dict[str, object] = {}
    if config.adm_in_channels:  # SDXL: pooled text + Fourier-embedded numbers ("text_time")
        vector = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": config.vector_embed_dim,
            "projection_class_embeddings_input_dim": config.adm_in_channels,
        }
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": tuple(widths),
        "layers_per_block": config.num_res_blocks,
        # diffusers' historical name: this holds the head *count* per level
        "attention_head_dim": tuple(config.heads_at(w)[0] for w in widths),
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": depths if config.level_depths else config.transformer_depth,
        "use_linear_projection": config.use_linear_proj,
        "norm_num_groups": config.norm_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        **vector,
    }
