"""Parity of our U-Net with diffusers' UNet2DConditionModel (same random weights, fp32), and full-size
key inventories of SD 1.5 / SD 2.1 built on `meta`, checked against diffusers' model and against
`convert_ldm_unet_checkpoint`, diffusers' own reader of original single-file checkpoints.
"""

from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from latentforge.checkpoints.diffusers_folder import unet_config_from_diffusers
from latentforge.checkpoints.keymap_unet import (
    diffusers_config,
    diffusers_key_map,
    diffusers_to_ours,
    ours_to_diffusers,
)
from latentforge.models import unet as unet_module
from latentforge.models.configs import UNetConfig
from latentforge.models.families import FAMILIES, SD1_UNET, SD2_UNET
from latentforge.models.unet import UNetModel

# SD1-style: head count, conv projections; the deepest level has no attention (DownBlock2D/UpBlock2D).
SD1_TINY = UNetConfig(channel_mult=(1, 2, 2), attention_levels=(0, 1), num_heads=2, context_dim=32)
# SD2-style: head width, Linear projections, two transformer layers; level 0 without attention.
SD2_TINY = UNetConfig(
    channel_mult=(1, 2, 4),
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=16,
    use_linear_proj=True,
    transformer_depth=2,
    context_dim=48,
    norm_groups=16,
)
INPAINT_TINY = replace(SD1_TINY, in_channels=9)
# SD's structure (four levels, two ResBlocks each, attention at the first three) at a fifth of the width.
MID = UNetConfig(
    model_channels=64,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_levels=(0, 1, 2),
    num_heads=8,
    context_dim=64,
)


def _assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= tolerance * scale, f"max abs error {error:.3g} vs scale {scale:.3g}"


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norms start at (1, 0); random affine parameters make their weight mapping observable."""
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.2)


def _pair(config: UNetConfig) -> tuple[UNetModel, UNet2DConditionModel]:
    ours = UNetModel(config).eval()
    _randomize_norms(ours)
    reference = UNet2DConditionModel(**diffusers_config(config)).eval()
    reference.load_state_dict(ours_to_diffusers(ours.state_dict(), config), strict=True)
    return ours, reference


def _inputs(config: UNetConfig, height: int, width: int, batch: int = 2):
    x = torch.randn(batch, config.in_channels, height, width)
    timesteps = torch.tensor([999.0, 12.5, 500.0][:batch])  # continuous t, as samplers pass it
    context = torch.randn(batch, 9, config.context_dim)
    return x, timesteps, context


@pytest.mark.parametrize(
    ("config", "size"),
    [
        (SD1_TINY, (8, 12)),
        (SD1_TINY, (16, 36)),  # 1152 token rows: the inference feed-forward runs in two chunks
        (SD2_TINY, (12, 8)),
        (INPAINT_TINY, (8, 8)),
        (MID, (16, 24)),
        (SD1_TINY, (9, 13)),  # odd sizes: the Upsample meets the skip's size (forward_upsample_size)
        (MID, (13, 10)),
    ],
    ids=["sd1-8x12", "sd1-16x36", "sd2-12x8", "inpaint-8x8", "mid-16x24", "sd1-9x13", "mid-13x10"],
)
def test_matches_diffusers(config, size):
    ours, reference = _pair(config)
    x, timesteps, context = _inputs(config, *size)
    with torch.no_grad():
        expected = reference(x, timesteps, context).sample
        _assert_close(ours(x, timesteps, context), expected)


def test_small_feed_forward_chunks_match_diffusers(monkeypatch):
    monkeypatch.setattr(unet_module, "FF_CHUNK_ROWS", 7)  # uneven chunks everywhere
    ours, reference = _pair(SD2_TINY)
    x, timesteps, context = _inputs(SD2_TINY, 8, 12)
    with torch.no_grad():
        _assert_close(ours(x, timesteps, context), reference(x, timesteps, context).sample)


def test_gradients_match_diffusers():
    ours, reference = _pair(SD1_TINY)
    x, timesteps, context = _inputs(SD1_TINY, 8, 12)
    weights = torch.randn(2, SD1_TINY.out_channels, 8, 12)
    inputs = {}
    for name in ("ours", "reference"):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        out = ours(xi, timesteps, ci) if name == "ours" else reference(xi, timesteps, ci).sample
        (out * weights).sum().backward()
        inputs[name] = (xi.grad, ci.grad)
    for ours_grad, reference_grad in zip(inputs["ours"], inputs["reference"], strict=True):
        _assert_close(ours_grad, reference_grad)
    ours_grads = ours_to_diffusers({k: p.grad for k, p in ours.named_parameters()}, SD1_TINY)
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    for key, parameter in reference.named_parameters():
        # Per tensor; the floor covers biases whose true gradient is zero (a bias before a GroupNorm
        # with one channel per group), where only rounding noise remains.
        scale = max(parameter.grad.abs().max().item(), 1e-4 * largest)
        error = (ours_grads[key] - parameter.grad).abs().max().item()
        assert error <= 1e-3 * scale, f"{key}: max abs error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_state_dict_round_trip_through_diffusers_layout(config):
    ours = UNetModel(config).state_dict()
    back = diffusers_to_ours(ours_to_diffusers(ours, config), config)
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)


def test_projection_form_is_coerced_to_the_config():
    ours = UNetModel(SD2_TINY).state_dict()
    theirs = ours_to_diffusers(ours, SD2_TINY)
    key = "down_blocks.1.attentions.0.proj_in.weight"
    assert theirs[key].ndim == 2
    theirs[key] = theirs[key][:, :, None, None]  # as saved by a conv-projection model
    UNetModel(SD2_TINY).load_state_dict(diffusers_to_ours(theirs, SD2_TINY), strict=True)


def test_unknown_keys_are_listed():
    with pytest.raises(ValueError, match="down_blocks.9.resnets.0.conv1.weight"):
        diffusers_to_ours({"down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)}, SD1_TINY)


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("config", [SD1_UNET, SD2_UNET], ids=["sd15", "sd21"])
def test_full_size_inventory_matches_diffusers(config):
    with torch.device("meta"):
        ours = UNetModel(config).state_dict()
        reference = UNet2DConditionModel(**diffusers_config(config)).state_dict()
    assert len(diffusers_key_map(config)) == len(set(diffusers_key_map(config).values())) == len(ours)
    assert _shapes(ours_to_diffusers(ours, config)) == _shapes(reference)
    assert _shapes(diffusers_to_ours(reference, config)) == _shapes(ours)


@pytest.mark.parametrize("config", [SD1_UNET, SD2_UNET], ids=["sd15", "sd21"])
def test_full_size_keymap_matches_convert_ldm_unet_checkpoint(config):
    with torch.device("meta"):
        ours = UNetModel(config).state_dict()
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    expected = convert_ldm_unet_checkpoint(checkpoint, diffusers_config(config))
    converted = ours_to_diffusers(ours, config)
    assert converted.keys() == expected.keys()
    # Identity, not just shape: to_k and to_v (or norm1 and norm2) have equal shapes.
    assert all(converted[k] is expected[k] for k in expected)


def test_diffusers_config_matches_the_published_configs():
    sd15 = diffusers_config(SD1_UNET)
    assert sd15["block_out_channels"] == (320, 640, 1280, 1280)
    assert sd15["attention_head_dim"] == (8, 8, 8, 8)
    assert sd15["down_block_types"][-1] == "DownBlock2D" and sd15["up_block_types"][0] == "UpBlock2D"
    sd21 = diffusers_config(SD2_UNET)
    assert sd21["attention_head_dim"] == (5, 10, 20, 20)
    assert sd21["use_linear_projection"] and sd21["cross_attention_dim"] == 1024


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_diffusers_config_round_trips(name):
    config = FAMILIES[name].unet
    assert unet_config_from_diffusers(diffusers_config(config)) == config
