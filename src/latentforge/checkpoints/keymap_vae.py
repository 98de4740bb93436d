"""diffusers `AutoencoderKL` <-> original LDM VAE keys (ours), generated from the config.

Modules are paired by a few loops over the levels; parameter names are kept. The mid-block attention
is the one place where tensors change: the original uses 1x1 convs ([C, C, 1, 1]) where diffusers
uses Linear layers ([C, C]). Both directions are exact inverses. diffusers assumes
`embed_dim == z_channels` (its `latent_channels`).
"""

from __future__ import annotations

from latentforge.checkpoints.reading import StateDict
from latentforge.models.configs import VAEConfig

_RESNET_LEAVES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_SHORTCUT = ("nin_shortcut", "conv_shortcut")
_ATTENTION_LEAVES = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
_LINEAR_LEAVES = ("q", "k", "v", "proj_out")  # 1x1 conv in ours, Linear in diffusers


def _resnet(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in (*_RESNET_LEAVES, _SHORTCUT)]


def module_map(config: VAEConfig) -> dict[str, str]:
    """Our module path -> diffusers module path for every parameterised leaf module of the config."""
    levels = len(config.ch_mult)
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.conv_out", f"{side}.conv_out")]
        pairs.append((f"{side}.norm_out", f"{side}.conv_norm_out"))
        pairs += _resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        pairs += _resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        pairs += [
            (f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}") for a, b in _ATTENTION_LEAVES
        ]
    for i in range(levels):
        for j in range(config.num_res_blocks):
            pairs += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        # diffusers numbers the decoder's up blocks in execution order, the original by resolution level
        level = levels - 1 - i
        for j in range(config.num_res_blocks + 1):
            pairs += _resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return dict(pairs)


def _is_attention_linear(ours_module: str) -> bool:
    parent, _, leaf = ours_module.rpartition(".")
    return parent.endswith("mid.attn_1") and leaf in _LINEAR_LEAVES


def _rename(state_dict: StateDict, names: dict[str, str], direction: str) -> StateDict:
    out: StateDict = {}
    unknown = []
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if module not in names:
            unknown.append(key)
            continue
        out[f"{names[module]}.{param}"] = tensor
    if unknown:
        raise ValueError(f"{direction}: keys with no counterpart for this VAEConfig: {sorted(unknown)[:10]}")
    return out


def diffusers_to_ours(state_dict: StateDict, config: VAEConfig) -> StateDict:
    """Convert a diffusers `AutoencoderKL` state dict to our (original LDM) keys."""
    names = {theirs: ours for ours, theirs in module_map(config).items()}
    out = _rename(state_dict, names, "diffusers_to_ours")
    for key, tensor in out.items():
        if _is_attention_linear(key.rpartition(".")[0]) and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
    return out


def ours_to_diffusers(state_dict: StateDict, config: VAEConfig) -> StateDict:
    """Convert our (original LDM) VAE keys to a diffusers `AutoencoderKL` state dict."""
    names = module_map(config)
    linear_keys = {
        k for k in state_dict if _is_attention_linear(k.rpartition(".")[0]) and k.endswith("weight")
    }
    out = _rename(state_dict, names, "ours_to_diffusers")
    for key in linear_keys:
        diffusers_key = f"{names[key.rpartition('.')[0]]}.weight"
        out[diffusers_key] = state_dict[key][:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
    return out
