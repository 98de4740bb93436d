"""Files from our kohya writer loaded by diffusers (`load_lora_weights` + `fuse_lora`) on tiny random SD1/SD2:
the fused weights equal ours after `apply_loras` (1e-5 relative), and diffusers drops none of the modules."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline

from latentforge.checkpoints import keymap_unet
from latentforge.checkpoints.lora import apply_loras
from latentforge.checkpoints.lora_writing import kohya_targets, save_kohya_lora
from latentforge.models.families import TINY, TINY_SD2
from references import assert_close, build_pair, random_lora_factors, write_hf_clip_vocab


@pytest.fixture(scope="module", params=[TINY, TINY_SD2], ids=lambda family: family.name)
def pair(request, tmp_path_factory):
    vocab = write_hf_clip_vocab(tmp_path_factory.mktemp("vocab"))
    return build_pair(request.param, StableDiffusionPipeline, vocab)


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_written_lora_fuses_like_diffusers(pair, tmp_path, conv):
    ours, pipe = pair
    family = ours.family
    factors = random_lora_factors(family, kohya_targets(family, conv=conv), seed=5)
    path = save_kohya_lora(
        tmp_path / "lora.safetensors", factors, family, {"ss_network_module": "networks.lora"}
    )
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    pipe.load_lora_weights(str(path), adapter_name="w")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.8, adapter_names=["w"])
    plain = {
        k.replace(".base_layer", ""): v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k
    }
    text = {
        k.replace(".base_layer", ""): v.clone()
        for k, v in pipe.text_encoder.state_dict().items()
        if "lora_" not in k
    }
    pipe.unfuse_lora()
    pipe.unload_lora_weights()

    unet_targets = [n for n in factors if n.startswith("model.")]
    diffusers_names = {v: k for k, v in keymap_unet.diffusers_key_map(family.unet).items()}
    expected = {diffusers_names[n.removeprefix("model.diffusion_model.") + ".weight"] for n in unet_targets}
    assert {k for k in plain if not torch.equal(plain[k], before[k])} == expected  # none dropped, none extra

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_loras(ours, [(path, 0.8, 0.8)])
    try:
        mine = keymap_unet.ours_to_diffusers(ours.unet.state_dict(), family.unet)
        for key in plain:
            assert_close(mine[key], plain[key], 1e-5)
        compared = 0
        te = ours.text_encoder.state_dict()
        for key, value in text.items():
            if "position_ids" not in key:
                assert_close(te[key if key in te else f"text_model.{key}"], value, 1e-5)
                compared += 1
        assert compared >= 6 * family.text_encoder.layers
    finally:
        handle.undo()
