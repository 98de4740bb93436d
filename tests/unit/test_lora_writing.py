"""The kohya LoRA writer: kohya's names, and write -> read_lora -> apply gives the update written."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from safetensors import safe_open

from latentforge.checkpoints.lora import apply_loras
from latentforge.checkpoints.lora_writing import (
    kohya_names,
    kohya_targets,
    module_shapes,
    save_kohya_lora,
)
from latentforge.errors import NonFiniteError, ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import SD1, SD2, TINY, TINY_SD2
from references import random_lora_factors as random_factors

RANK = 3


def expected_update(factors) -> torch.Tensor:
    """alpha / r * up @ down, computed here with einsum (conv: over the rank, kernel kept)."""
    down, up, alpha = factors
    update = torch.einsum("or,r...->o...", up.flatten(1).double(), down.double())
    return float(alpha) / down.shape[0] * update


def test_names_are_kohyas():
    # kohya's create_modules: "lora_unet" + "." + diffusers module name, dots -> underscores
    names = kohya_names(SD1)
    unet = "model.diffusion_model."
    assert names[unet + "input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert names[unet + "output_blocks.11.1.transformer_blocks.0.ff.net.2"] == (
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"
    )
    assert names[unet + "middle_block.1.proj_in"] == "lora_unet_mid_block_attentions_0_proj_in"
    assert names[unet + "input_blocks.3.0.op"] == "lora_unet_down_blocks_0_downsamplers_0_conv"
    assert names[unet + "output_blocks.2.1.conv"] == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert (
        names[unet + "input_blocks.4.0.skip_connection"] == "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    )
    text = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert names[text] == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_names(SD2)[text.replace("layers.0", "layers.23")].endswith("layers_23_self_attn_q_proj")


def test_targets_are_kohyas_module_count():
    # kohya's SD1 LoRA: 192 U-Net modules (16 transformers x 12) and 72 text-encoder modules (12 x 6)
    linear = kohya_targets(SD1)
    assert sum(n.startswith("model.") for n in linear) == 192
    assert sum(n.startswith("cond_stage_model.") for n in linear) == 72
    conv = kohya_targets(SD1, conv=True)
    # LoCon adds 22 ResnetBlock2Ds (8 down, 2 mid, 12 up) x (conv1, conv2, time_emb_proj), 14 conv_shortcuts
    # (down_blocks.1/2.resnets.0 and all 12 up resnets) and 3 Downsample2D + 3 Upsample2D convs
    assert sum(n.startswith("model.") for n in conv) == 192 + 22 * 3 + 14 + 6
    assert set(linear) < set(conv)
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2" in conv
    assert "model.diffusion_model.time_embed.0" not in conv and "model.diffusion_model.out.2" not in conv


@pytest.mark.parametrize("family", [TINY, TINY_SD2], ids=lambda f: f.name)
def test_write_read_apply_round_trip(family, tmp_path):
    torch.manual_seed(0)
    model = StableDiffusion.from_family(family)
    factors = random_factors(family, kohya_targets(family, conv=True))
    path = save_kohya_lora(tmp_path / "lora.safetensors", factors, family, {"ss_network_dim": str(RANK)})
    before = {"model.diffusion_model." + k: v.clone() for k, v in model.unet.state_dict().items()} | {
        "cond_stage_model.transformer." + k: v.clone() for k, v in model.text_encoder.state_dict().items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every written module must be found by the reader
        handle = apply_loras(model, [(path, 1.0, None)])
    after = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()} | {
        "cond_stage_model.transformer." + k: v for k, v in model.text_encoder.state_dict().items()
    }
    for name, f in factors.items():
        key = f"{name}.weight"
        delta = (after[key].double() - before[key].double()).reshape(expected_update(f).shape)
        torch.testing.assert_close(delta, expected_update(f), rtol=1e-5, atol=1e-6)
    touched = {k for k in after if not torch.equal(after[k], before[k])}
    assert touched == {f"{name}.weight" for name in factors}
    handle.undo()
    assert all(torch.equal(model.unet.state_dict()[k.removeprefix("model.diffusion_model.")], v)
               for k, v in before.items() if k.startswith("model."))  # fmt: skip


def test_metadata_dtype_and_hash(tmp_path):
    factors = random_factors(TINY, kohya_targets(TINY)[:4])
    path = save_kohya_lora(tmp_path / "a.safetensors", factors, TINY, {"ss_v2": "False"}, dtype=torch.float16)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
        dtypes = {k: f.get_tensor(k).dtype for k in keys}
    assert metadata["ss_v2"] == "False"
    assert all(dtypes[k] == (torch.float32 if k.endswith(".alpha") else torch.float16) for k in keys)
    assert len(keys) == 3 * 4
    # sshs_model_hash is the SHA-256 of the file's data section, as kohya's train_util computes it
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[start:]).hexdigest()


def test_linear_factors_on_a_1x1_conv_are_written_as_conv(tmp_path):
    name = "model.diffusion_model.input_blocks.1.1.proj_in"  # a 1x1 conv in SD1-layout families
    assert len(module_shapes(TINY)[name]) == 4
    factors = random_factors(TINY, [name])
    down, up, alpha = factors[name]
    path = save_kohya_lora(tmp_path / "a.safetensors", {name: (down.flatten(1), up.flatten(1), alpha)}, TINY)
    with safe_open(path, "pt") as f:
        key = kohya_names(TINY)[name]
        assert f.get_tensor(f"{key}.lora_down.weight").ndim == 4
        assert f.get_tensor(f"{key}.lora_up.weight").shape[2:] == (1, 1)


def test_bad_input_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "bad.safetensors"
    name = kohya_targets(TINY)[0]
    good = random_factors(TINY, [name])[name]
    with pytest.raises(ParameterError, match="no U-Net or text-encoder module"):
        save_kohya_lora(out, {"model.diffusion_model.nothing.here": good}, TINY)
    with pytest.raises(ParameterError, match="the weight is"):
        save_kohya_lora(out, {name: (good.down[:, :-1], good.up, 1.0)}, TINY)
    with pytest.raises(ParameterError, match="are not"):
        save_kohya_lora(out, {name: (good.down, good.up.transpose(0, 1), 1.0)}, TINY)
    with pytest.raises(NonFiniteError):
        save_kohya_lora(out, {name: (good.down * float("nan"), good.up, 1.0)}, TINY)
    with pytest.raises(ParameterError, match="strings"):
        save_kohya_lora(out, {name: good}, TINY, {"ss_network_dim": 4})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())
