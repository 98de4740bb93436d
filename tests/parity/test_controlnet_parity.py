"""Our ControlNet against diffusers' `ControlNetModel` on the same tiny random weights, and the full-size
key inventory of an original-format SD 1.5 ControlNet against diffusers' single-file converter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from latentforge.checkpoints import keymap_controlnet
from latentforge.checkpoints.controlnet import PREFIX, detect_config, load_controlnet
from latentforge.models.controlnet import ControlNetConfig, ControlNetModel
from latentforge.models.families import SD1, SD2, TINY, TINY_SD2
from references import assert_close, randomize_norms


def random_controlnet(config: ControlNetConfig) -> ControlNetModel:
    """Random weights everywhere, the zero convs too, so every residual depends on every mapped tensor."""
    torch.manual_seed(0)
    model = ControlNetModel(config).eval()
    for name, p in model.named_parameters():
        if "zero_convs" in name or "middle_block_out" in name or name.startswith("input_hint_block.14"):
            torch.nn.init.normal_(p, std=0.2)
    for i in range(0, len(model.input_hint_block), 2):
        torch.nn.init.normal_(model.input_hint_block[i].weight, std=0.2)
    randomize_norms(model)
    return model


@pytest.mark.parametrize("family", [TINY, TINY_SD2], ids=lambda f: f.name)
def test_forward_matches_diffusers(family):
    config = ControlNetConfig.for_base(family.unet, family.vae.downsampling_factor)
    ours = random_controlnet(config)
    theirs = DiffusersControlNet(**keymap_controlnet.diffusers_config(config)).eval()
    theirs.load_state_dict(keymap_controlnet.ours_to_diffusers(ours.state_dict(), config), strict=True)
    f = config.downsampling_factor
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([17.0, 640.5])
    context, hint = torch.randn(2, 7, family.unet.context_dim), torch.rand(2, 3, 8 * f, 12 * f)
    with torch.no_grad():
        residuals = ours(x, t, context, hint)
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(residuals) == len(down) + 1
    for a, b in zip(residuals, [*down, mid], strict=True):
        assert b.abs().max() > 1e-3  # a real signal, not zeros on both sides
        assert_close(a, b, tolerance=1e-5)


@pytest.mark.parametrize("family", [SD1, SD2], ids=lambda f: f.name)
def test_full_size_inventory_matches_diffusers_converter(family):
    """Built on meta: our original keys -> diffusers' converter equals our generated map, key for key."""
    config = ControlNetConfig.for_base(family.unet, family.vae.downsampling_factor)
    with torch.device("meta"):
        ours = ControlNetModel(config)
        theirs = DiffusersControlNet(**keymap_controlnet.diffusers_config(config))
    state = ours.state_dict()
    original = {PREFIX + k: v for k, v in state.items()}
    converted = convert_controlnet_checkpoint(original, {"layers_per_block": config.unet.num_res_blocks})
    generated = keymap_controlnet.ours_to_diffusers(state, config)
    assert set(converted) == set(generated) == set(theirs.state_dict())
    for key, tensor in converted.items():  # the same tensor object: both maps send it to the same key
        assert generated[key] is tensor, key
    assert {k: tuple(v.shape) for k, v in generated.items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    if family is SD1:
        assert len(original) == 340  # the tensor count of lllyasviel's control_v11p_sd15_*.pth


def test_detects_family_from_full_size_meta_weights():
    for family in (SD1, SD2):
        config = ControlNetConfig.for_base(family.unet, family.vae.downsampling_factor)
        with torch.device("meta"):
            weights = ControlNetModel(config).state_dict()
        assert detect_config(Path("x.pth"), weights) == (family.name, config)


def test_diffusers_folder_and_original_file_load_to_the_same_weights(tmp_path):
    config = ControlNetConfig.for_base(TINY.unet, TINY.vae.downsampling_factor)
    ours = random_controlnet(config)
    theirs = DiffusersControlNet(**keymap_controlnet.diffusers_config(config))
    theirs.load_state_dict(keymap_controlnet.ours_to_diffusers(ours.state_dict(), config), strict=True)
    theirs.save_pretrained(tmp_path / "folder")
    from safetensors.torch import save_file

    save_file({PREFIX + k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "cn.safetensors")
    torch.save({PREFIX + k: v for k, v in ours.state_dict().items()}, tmp_path / "cn.pth")
    for path in (tmp_path / "folder", tmp_path / "cn.safetensors", tmp_path / "cn.pth"):
        loaded = load_controlnet(path)
        assert loaded.model.config == config
        for key, value in ours.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), (path, key)
