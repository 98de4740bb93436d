"""Single-file checkpoints written by us are read by diffusers' own converters with the same outputs.

A tiny random model is saved by `save_single_file` in the original layout (SD1: transformers-style text
keys; SD2: OpenCLIP keys with fused q/k/v). diffusers reads it offline, once through the user-facing
`StableDiffusionPipeline.from_single_file(config=<local folder>)` and once through the converter
functions of `diffusers.loaders.single_file_utils`; U-Net, VAE and text encoder outputs must match ours
(fp32). The folder holds `diffusers_configs(family)` and a CLIP tokenizer, so nothing is downloaded.
"""

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

import latentforge
from latentforge.checkpoints.diffusers_folder import diffusers_configs, write_diffusers_configs
from latentforge.checkpoints.single_file import save_single_file
from latentforge.model import StableDiffusion
from latentforge.models.configs import TextEncoderConfig, UNetConfig
from latentforge.models.families import TINY, ModelFamily
from references import assert_close, randomize_norms, write_hf_clip_vocab

TINY_SD2 = replace(
    TINY,
    name="tiny-sd2",
    text_layout="openclip",
    text_encoder=TextEncoderConfig(activation="gelu", projection_dim=24, pad_token=0),
    unet=UNetConfig(num_heads=None, head_dim=16, use_linear_proj=True, transformer_depth=2),
    prediction="v",
)
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _save(tmp_path, family: ModelFamily):
    """A random model of `family` saved by us; returns (our loaded bundle, file, diffusers config folder)."""
    bundle = StableDiffusion.from_family(family)
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        randomize_norms(module)
    path = tmp_path / "model.safetensors"
    save_single_file(
        path,
        bundle.unet.state_dict(),
        bundle.vae.state_dict(),
        bundle.text_encoder.state_dict(),
        family,
    )
    config = write_diffusers_configs(family, tmp_path / "config")
    write_hf_clip_vocab(config / "tokenizer")
    return latentforge.load(path), path, config


def _inputs(ours: StableDiffusion):
    config = ours.family.unet
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    ids = ours.tokenizer(["a photo of a cat", "an astronaut riding a horse"])
    return x, torch.tensor([999.0, 37.0]), context, ids


def _compare(ours: StableDiffusion, unet, vae, text) -> None:
    x, t, context, ids = _inputs(ours)
    with torch.no_grad():
        assert_close(ours.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample, TOLERANCE)
        assert_close(ours.vae.decode(x[:1]), vae.decode(x[:1]).sample, TOLERANCE)
        assert_close(ours.text_encoder(ids)[0], text(ids).last_hidden_state, TOLERANCE)


def test_from_single_file_reads_our_sd1_checkpoint(tmp_path):
    ours, path, config = _save(tmp_path, TINY)
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32
    )
    assert pipe.vae.config.scaling_factor == TINY.latent_scale
    _compare(ours, pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval())


@pytest.mark.parametrize("family", [TINY, TINY_SD2], ids=["sd1-layout", "sd2-openclip-layout"])
def test_diffusers_converters_read_our_checkpoint(tmp_path, family):
    ours, path, config = _save(tmp_path, family)
    checkpoint = load_file(path)
    configs = diffusers_configs(family)

    unet_config = configs["unet/config.json"]
    unet = UNet2DConditionModel.from_config(unet_config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = configs["vae/config.json"]
    vae = AutoencoderKL.from_config(vae_config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    # diffusers' SD 2.x text encoder is a plain CLIPTextModel: it ignores `text_projection` (and layer 23)
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")).eval()
    if family.text_layout == "openclip":
        converted = convert_open_clip_checkpoint(text, checkpoint)
    else:
        converted = convert_ldm_clip_checkpoint(checkpoint)
    # transformers 5's CLIPTextModel has no `text_model.` level (diffusers strips it the same way)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = text.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    _compare(ours, unet, vae, text)


def test_sd2_checkpoint_keys_are_what_diffusers_expects(tmp_path):
    """OpenCLIP layout: fused in_proj, bare positional_embedding, text_projection, logit_scale."""
    _, path, _ = _save(tmp_path, TINY_SD2)
    keys = load_file(path).keys()
    prefix = "cond_stage_model.model."
    expected = {
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "ln_final.weight",
        "token_embedding.weight",
    }
    assert {prefix + k for k in expected} <= keys
    assert f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
