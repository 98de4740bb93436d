"""diffusers `ControlNetModel` <-> original (`cldm.py`) ControlNet keys, generated from the config.

The encoder half (`time_embed`, `input_blocks`, `middle_block`) is named as in the U-Net, so its pairs are the
U-Net map's (`keymap_unet.diffusers_key_map`) restricted to those modules. The rest is three small tables:
the hint encoder (`controlnet_cond_embedding.conv_in / blocks.J / conv_out` <-> `input_hint_block.0 / 2(J+1)
/ last`, the odd slots being SiLU), the zero convs (`controlnet_down_blocks.N` <-> `zero_convs.N.0`) and the
middle output (`controlnet_mid_block` <-> `middle_block_out.0`).
"""

from __future__ import annotations

from latentforge.checkpoints import keymap_unet
from latentforge.checkpoints.reading import StateDict
from latentforge.models.controlnet import ControlNetConfig

ENCODER_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.")


def _params(theirs: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{theirs}.weight", f"{ours}.weight"), (f"{theirs}.bias", f"{ours}.bias")]


def diffusers_key_map(config: ControlNetConfig) -> dict[str, str]:
    """Every parameter key of a diffusers `ControlNetModel` of this config -> our (original) key."""
    unet = config.unet
    pairs = [(k, v) for k, v in keymap_unet.diffusers_key_map(unet).items() if v.startswith(ENCODER_PREFIXES)]
    strided = len(config.hint_block_channels) - 1
    pairs += _params("controlnet_cond_embedding.conv_in", "input_hint_block.0")
    for j in range(2 * strided):  # diffusers' blocks alternate a same-width conv and a stride-2 conv
        pairs += _params(f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * (j + 1)}")
    pairs += _params("controlnet_cond_embedding.conv_out", f"input_hint_block.{4 * strided + 2}")
    blocks = 1 + len(unet.channel_mult) * unet.num_res_blocks + len(unet.channel_mult) - 1
    for n in range(blocks):
        pairs += _params(f"controlnet_down_blocks.{n}", f"zero_convs.{n}.0")
    pairs += _params("controlnet_mid_block", "middle_block_out.0")
    return dict(pairs)


def _convert(
    state_dict: StateDict, names: dict[str, str], config: ControlNetConfig, direction: str
) -> StateDict:
    unknown = sorted(key for key in state_dict if key not in names)
    if unknown:
        raise ValueError(
            f"{direction}: {len(unknown)} keys have no counterpart in a ControlNet: {unknown[:10]}"
        )
    linear = config.unet.use_linear_proj
    return {names[k]: keymap_unet._fit_projection(k, v, linear) for k, v in state_dict.items()}


def diffusers_to_ours(state_dict: StateDict, config: ControlNetConfig) -> StateDict:
    """Convert a diffusers `ControlNetModel` state dict to original (cldm) keys."""
    return _convert(state_dict, diffusers_key_map(config), config, "diffusers_to_ours")


def ours_to_diffusers(state_dict: StateDict, config: ControlNetConfig) -> StateDict:
    """Convert original (cldm) ControlNet keys to a diffusers `ControlNetModel` state dict."""
    names = {ours: theirs for theirs, ours in diffusers_key_map(config).items()}
    return _convert(state_dict, names, config, "ours_to_diffusers")


def diffusers_config(config: ControlNetConfig) -> dict[str, object]:
    """`ControlNetModel` keyword arguments for this config."""
    unet = keymap_unet.diffusers_config(config.unet)
    keep = (
        "in_channels",
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "use_linear_projection",
        "norm_num_groups",
        "flip_sin_to_cos",
        "freq_shift",
    )
    return {
        **{k: unet[k] for k in keep},
        "conditioning_channels": config.hint_channels,
        "conditioning_embedding_out_channels": config.hint_block_channels,
    }
