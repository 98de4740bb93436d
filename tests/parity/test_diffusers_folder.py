"""diffusers folders: random diffusers/transformers components saved with `save_pretrained`, loaded by
`latentforge.load(folder)`, give the same U-Net, VAE and text encoder outputs (fp32). Also: the published
SD 1.5 / SD 2.1 configs (no weights) translate to the table families, and broken folders fail clearly.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import latentforge
from latentforge.checkpoints.diffusers_folder import diffusers_configs, family_from_diffusers
from latentforge.checkpoints.errors import CheckpointNotFoundError, UnknownArchitectureError
from latentforge.checkpoints.keymap_unet import diffusers_config
from latentforge.models.configs import TextEncoderConfig, UNetConfig
from latentforge.models.families import FAMILIES, SD2, TINY, ModelFamily
from references import assert_close, diffusers_vae_config, randomize_norms, write_hf_clip_vocab

TINY_SD2 = replace(
    TINY,
    name="tiny-sd2",
    text_layout="openclip",
    text_encoder=TextEncoderConfig(activation="gelu", projection_dim=24, pad_token=0),
    unet=UNetConfig(num_heads=None, head_dim=16, use_linear_proj=True, transformer_depth=2),
)
TOLERANCE = 1e-5


def _text_config(config: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or config.width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=config.pad_token,
    )


def _write_folder(root: Path, family: ModelFamily, *, prediction: str = "epsilon", bin_weights: bool = False):
    """Random diffusers/transformers components of `family`, saved as a diffusers folder; returns them."""
    unet = UNet2DConditionModel(**diffusers_config(family.unet)).eval()
    vae = AutoencoderKL(**diffusers_vae_config(family.vae)).eval()
    text_cls = CLIPTextModelWithProjection if family.text_encoder.projection_dim else CLIPTextModel
    text = text_cls(_text_config(family.text_encoder)).eval()
    for model in (unet, vae, text):
        randomize_norms(model)
    unet.save_pretrained(root / "unet", safe_serialization=not bin_weights)
    vae.save_pretrained(root / "vae", safe_serialization=not bin_weights)
    text.save_pretrained(root / "text_encoder")
    if bin_weights:  # transformers 5 writes only safetensors; older versions wrote pytorch_model.bin
        (root / "text_encoder" / "model.safetensors").unlink()
        torch.save(text.state_dict(), root / "text_encoder" / "pytorch_model.bin")
    pad = "!" if family.text_encoder.pad_token == 0 else "<|endoftext|>"
    tokenizer = CLIPTokenizer.from_pretrained(str(write_hf_clip_vocab(root / "vocab")), pad_token=pad)
    tokenizer.save_pretrained(root / "tokenizer")
    DDIMScheduler(prediction_type=prediction).save_pretrained(root / "scheduler")
    return unet, vae, text


def _assert_same_outputs(ours: latentforge.StableDiffusion, unet, vae, text) -> None:
    config = ours.family.unet
    x = torch.randn(2, config.in_channels, 16, 16)
    t = torch.tensor([999.0, 37.0])
    context = torch.randn(2, 7, config.context_dim)
    ids = ours.tokenizer(["a photo of a cat", "an astronaut riding a horse on the moon"])
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert_close(ours.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample, TOLERANCE)
        assert_close(ours.vae.decode(x[:1]), vae.decode(x[:1]).sample, TOLERANCE)
        assert_close(ours.vae.encode(image).mean, vae.encode(image).latent_dist.mean, TOLERANCE)
        hidden, pooled = ours.text_encoder(ids)
        reference = text(ids)
        assert_close(hidden, reference.last_hidden_state, TOLERANCE)
        if ours.family.text_encoder.projection_dim:
            assert_close(pooled, reference.text_embeds, TOLERANCE)


@pytest.mark.parametrize("family", [TINY, TINY_SD2], ids=["sd1-style", "sd2-style"])
def test_folder_loads_with_diffusers_outputs(tmp_path, family):
    unet, vae, text = _write_folder(tmp_path / "model", family)
    keys = set(text.state_dict())
    # transformers 5: CLIPTextModel has no `text_model.` level; CLIPTextModelWithProjection keeps it
    assert any(k.startswith("text_model.") for k in keys) == (family.text_encoder.projection_dim is not None)
    ours = latentforge.load(tmp_path / "model")
    assert (ours.family.unet, ours.family.vae, ours.family.text_encoder) == (
        family.unet,
        family.vae,
        family.text_encoder,
    )
    assert ours.family.text_layout == family.text_layout and ours.family.prediction == "epsilon"
    assert ours.name == "model" and ours.short_hash is None
    _assert_same_outputs(ours, unet, vae, text)


def test_bin_weights_and_v_prediction(tmp_path):
    unet, vae, text = _write_folder(tmp_path / "m", TINY, prediction="v_prediction", bin_weights=True)
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((tmp_path / "m").glob("*/*.safetensors"))
    ours = latentforge.load(tmp_path / "m")
    assert ours.family.prediction == "v"
    _assert_same_outputs(ours, unet, vae, text)
    assert latentforge.load(tmp_path / "m", prediction="epsilon").family.prediction == "epsilon"


def test_half_precision_folder(tmp_path):
    unet, *_ = _write_folder(tmp_path / "m", TINY)
    ours = latentforge.load(tmp_path / "m", dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.vae_dtype == torch.bfloat16
    key = "conv_in.weight"
    assert torch.equal(ours.unet.state_dict()["input_blocks.0.0.weight"], unet.state_dict()[key].bfloat16())


def test_shortened_text_encoder_is_the_penultimate_layer(tmp_path):
    """diffusers ships SD 2.x's text encoder cut to 23 of 24 layers: with clip skip 1 it gives what the
    full encoder gives with clip skip 2 (hidden states of the penultimate layer, final LayerNorm)."""
    full = latentforge.StableDiffusion.from_family(
        replace(TINY_SD2, text_encoder=replace(TINY_SD2.text_encoder, layers=3))
    )
    _write_folder(tmp_path / "m", TINY_SD2)
    cut = CLIPTextModel(_text_config(replace(TINY_SD2.text_encoder, layers=2, projection_dim=None)))
    sd = {k.removeprefix("text_model."): v for k, v in full.text_encoder.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("encoder.layers.2.", "text_projection"))}
    cut.load_state_dict(sd, strict=False)
    for f in (tmp_path / "m" / "text_encoder").iterdir():
        f.unlink()
    cut.save_pretrained(tmp_path / "m" / "text_encoder")
    ours = latentforge.load(tmp_path / "m")
    assert ours.family.text_encoder.layers == 2 and ours.family.text_encoder.projection_dim is None
    ids = ours.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        assert_close(
            ours.text_encoder(ids, clip_skip=1)[0], full.text_encoder(ids, clip_skip=2)[0], TOLERANCE
        )


# The published configs (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1), abridged to
# the fields that matter; keys diffusers fills with defaults are left out as in the originals.
SD15_CONFIGS = {
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder/config.json": {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408,
    },
    "tokenizer/special_tokens_map.json": {
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True},
        "pad_token": "<|endoftext|>",
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True},
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
}
SD21_CONFIGS = {
    "unet/config.json": {
        **SD15_CONFIGS["unet/config.json"],
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "sample_size": 96,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "vae/config.json": {**SD15_CONFIGS["vae/config.json"], "sample_size": 768},
    "text_encoder/config.json": {
        **SD15_CONFIGS["text_encoder/config.json"],
        "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
    },
    "tokenizer/special_tokens_map.json": {
        **SD15_CONFIGS["tokenizer/special_tokens_map.json"],
        "pad_token": "!",
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "trained_betas": None,
    },
}


def _write_configs(root: Path, configs: dict) -> Path:
    for name, config in configs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(config))
    return root


def test_published_sd15_configs_are_the_sd1_family(tmp_path):
    assert family_from_diffusers(_write_configs(tmp_path, SD15_CONFIGS)) == FAMILIES["sd1"]


def test_published_sd21_configs_are_sd2_v_with_a_23_layer_text_encoder(tmp_path):
    family = family_from_diffusers(_write_configs(tmp_path, SD21_CONFIGS))
    expected = replace(
        FAMILIES["sd2-v"],
        name="sd2-v-text23",
        text_encoder=replace(SD2.text_encoder, layers=23, projection_dim=None),
        default_clip_skip=1,
    )
    assert family == expected
    # SD 2.1-base: epsilon prediction, 512 px -> the sd2 entry
    base = dict(SD21_CONFIGS)
    base["unet/config.json"] = {**base["unet/config.json"], "sample_size": 64}
    base["scheduler/scheduler_config.json"] = {
        **base["scheduler/scheduler_config.json"],
        "prediction_type": "epsilon",
    }
    assert family_from_diffusers(_write_configs(tmp_path / "base", base)).name == "sd2-text23"


def test_sd21_configs_build_on_meta_with_diffusers_key_inventory(tmp_path):
    """Our full-size modules of the translated family hold exactly diffusers' parameter keys and shapes."""
    from latentforge.checkpoints import keymap_unet, keymap_vae
    from latentforge.models.text_encoder import CLIPTextModel as OurText
    from latentforge.models.unet import UNetModel
    from latentforge.models.vae import AutoencoderKL as OurVAE

    family = family_from_diffusers(_write_configs(tmp_path, SD21_CONFIGS))
    with torch.device("meta"):
        ours = {
            "unet": UNetModel(family.unet),
            "vae": OurVAE(family.vae),
            "text": OurText(family.text_encoder),
        }
        theirs = {
            "unet": UNet2DConditionModel.from_config(SD21_CONFIGS["unet/config.json"]),
            "vae": AutoencoderKL.from_config(SD21_CONFIGS["vae/config.json"]),
            "text": CLIPTextModel(CLIPTextConfig(**SD21_CONFIGS["text_encoder/config.json"])),
        }
    converted = {
        "unet": keymap_unet.diffusers_to_ours(theirs["unet"].state_dict(), family.unet),
        "vae": keymap_vae.diffusers_to_ours(theirs["vae"].state_dict(), family.vae),
        "text": {
            f"text_model.{k}": v for k, v in theirs["text"].state_dict().items() if "position_ids" not in k
        },
    }
    for name, module in ours.items():
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted[name].items()} == expected, name


def test_diffusers_configs_round_trip_every_family(tmp_path):
    for family in FAMILIES.values():
        assert (
            family_from_diffusers(_write_configs(tmp_path / family.name, diffusers_configs(family))) == family
        )


def test_missing_subfolder_is_a_clear_error(tmp_path):
    _write_folder(tmp_path / "m", TINY)
    for f in (tmp_path / "m" / "vae").iterdir():
        f.unlink()
    (tmp_path / "m" / "vae").rmdir()
    with pytest.raises(CheckpointNotFoundError, match=r"incomplete diffusers model: missing vae/"):
        latentforge.load(tmp_path / "m")


def test_missing_weights_and_non_model_folders(tmp_path):
    _write_folder(tmp_path / "m", TINY)
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"unet: no weights file"):
        latentforge.load(tmp_path / "m")
    (tmp_path / "photos").mkdir()
    with pytest.raises(UnknownArchitectureError, match="not a diffusers model"):
        latentforge.load(tmp_path / "photos")


def test_unsupported_addition_embedding_is_refused_clearly(tmp_path):
    # SDXL's "text_time" is supported (tests/parity/test_sdxl_loading.py); Kandinsky's "image" is not
    configs = dict(SD15_CONFIGS)
    configs["unet/config.json"] = {**configs["unet/config.json"], "addition_embed_type": "image"}
    with pytest.raises(UnknownArchitectureError, match="addition_embed_type"):
        family_from_diffusers(_write_configs(tmp_path, configs))
