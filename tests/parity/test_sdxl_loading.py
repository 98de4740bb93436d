"""SDXL checkpoints: full-size key/shape inventories of base and refiner single files built on `meta`
against diffusers' own single-file converter (loaders/single_file_utils.py), both ways; detection from
shapes; tiny single files and diffusers folders (text_encoder_2/, tokenizer_2/) load bit-exactly.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import latentforge
from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.checkpoints.assembly import SkipInitOnMeta
from latentforge.checkpoints.diffusers_folder import text_encoder_from_diffusers
from latentforge.checkpoints.errors import CheckpointError, UnknownArchitectureError
from latentforge.checkpoints.keymap_text import OPENCLIP_IGNORED
from latentforge.checkpoints.single_file import (
    detect_families,
    save_single_file,
    split_components,
    to_single_file_state_dict,
)
from latentforge.checkpoints.writing import save_safetensors
from latentforge.model import StableDiffusion
from latentforge.models.families import SDXL, SDXL_REFINER, TINY_XL, TINY_XL_REFINER, get_family
from references import diffusers_vae_config, transformers_text_config

# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json (the published values)
PUBLISHED = {
    "sdxl-base": {
        "block_out_channels": (320, 640, 1280),
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "projection_class_embeddings_input_dim": 2816,
        "addition_time_embed_dim": 256,
    },
    "sdxl-refiner": {
        "block_out_channels": (384, 768, 1536, 1536),
        "attention_head_dim": (6, 12, 24, 24),
        "transformer_layers_per_block": 4,
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,
        "addition_time_embed_dim": 256,
    },
}


def _shapes(sd):
    # transformers 5 saves CLIPTextModel without the `text_model.` level, diffusers' converter with it
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items()}


def _meta_single_file(family):
    with SkipInitOnMeta():
        bundle = StableDiffusion.from_family(family, device="meta")
    g = None if bundle.text_encoder_2 is None else bundle.text_encoder_2.state_dict()
    return to_single_file_state_dict(
        bundle.unet.state_dict(), bundle.vae.state_dict(), bundle.text_encoder.state_dict(), family, g
    )


def _diffusers_meta(family):
    """diffusers' / transformers' own models of the family on `meta`: {component: state dict}."""
    unet_config = keymap_unet.diffusers_config(family.unet)
    with torch.device("meta"), SkipInitOnMeta():
        models = {
            "unet": UNet2DConditionModel(**unet_config),
            "vae": AutoencoderKL(**diffusers_vae_config(family.vae)),
        }
        texts = (
            [family.text_encoder]
            if family.text_encoder_2 is None
            else [family.text_encoder, family.text_encoder_2]
        )
        for name, config in zip(("text_encoder", "text_encoder_2"), texts, strict=False):
            cls = CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel
            models[name] = cls(transformers_text_config(config))
    return {
        k: {n: t for n, t in m.state_dict().items() if "position_ids" not in n} for k, m in models.items()
    }


@pytest.mark.parametrize("family", [SDXL, SDXL_REFINER], ids=["base", "refiner"])
def test_full_size_single_file_matches_diffusers_converter(family):
    config = keymap_unet.diffusers_config(family.unet)
    for key, value in PUBLISHED[family.name].items():
        assert config[key] == value or (key == "transformer_layers_per_block" and config[key] == (0, 2, 10))
    checkpoint = _meta_single_file(family)
    assert (
        infer_diffusers_model_type(checkpoint)
        == {"sdxl-base": "xl_base", "sdxl-refiner": "xl_refiner"}[family.name]
    )
    reference = _diffusers_meta(family)
    # ours -> single file -> diffusers' converter == diffusers' models
    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, config),
        "vae": convert_ldm_vae_checkpoint(
            checkpoint, {"sample_size": 1024, **diffusers_vae_config(family.vae)}
        ),
    }
    with torch.device("meta"):
        if family.text_encoder_2 is not None:
            converted["text_encoder"] = convert_ldm_clip_checkpoint(checkpoint)
            g = CLIPTextModelWithProjection(transformers_text_config(family.text_encoder_2))
            converted["text_encoder_2"] = convert_open_clip_checkpoint(
                g, checkpoint, prefix="conditioner.embedders.1.model."
            )
        else:
            g = CLIPTextModelWithProjection(transformers_text_config(family.text_encoder))
            converted["text_encoder"] = convert_open_clip_checkpoint(
                g, checkpoint, prefix="conditioner.embedders.0.model."
            )
    for name, sd in reference.items():
        assert _shapes(converted[name]) == _shapes(sd), name
    # and back: diffusers' models -> our converters -> the same single file (open_clip's ignored keys aside)
    texts = [
        text_encoder_from_diffusers(reference[n])
        for n in ("text_encoder", "text_encoder_2")
        if n in reference
    ]
    back = to_single_file_state_dict(
        keymap_unet.diffusers_to_ours(reference["unet"], family.unet),
        keymap_vae.diffusers_to_ours(reference["vae"], family.vae),
        texts[0],
        family,
        texts[1] if len(texts) > 1 else None,
    )
    assert _shapes(back) == _shapes(checkpoint)
    assert sum(k.endswith(OPENCLIP_IGNORED) for k in checkpoint) == 1  # logit_scale, as sgm files carry
    # detected from shapes alone, as a table row
    assert detect_families(split_components(checkpoint), {}, "x") == [family]


def test_inpaint_detected_from_shapes():
    checkpoint = _meta_single_file(get_family("sdxl-inpaint"))
    assert [f.name for f in detect_families(split_components(checkpoint), {}, "x")] == ["sdxl-inpaint"]


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {f.name: StableDiffusion.from_family(f) for f in (TINY_XL, TINY_XL_REFINER)}


def _save(model, path, *, metadata=True):
    g = None if model.text_encoder_2 is None else model.text_encoder_2.state_dict()
    sds = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    if metadata:
        save_single_file(path, *sds, model.family, text_encoder_2=g)
    else:  # as a community file: no family metadata, detection from shapes
        save_safetensors(path, to_single_file_state_dict(*sds, model.family, g), {})
    return path


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
@pytest.mark.parametrize("metadata", [True, False], ids=["ours", "shapes"])
def test_tiny_single_file_round_trip(tiny_models, tmp_path, name, metadata):
    model = tiny_models[name]
    loaded = latentforge.load(_save(model, tmp_path / "m.safetensors", metadata=metadata), compute_hash=False)
    assert loaded.family == model.family
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(model, component), getattr(loaded, component)
        assert (ours is None) == (theirs is None)
        if ours is not None:
            for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
                assert torch.equal(a, b), k
    assert (loaded.tokenizer_2 is None) == (model.text_encoder_2 is None)


def test_fp16_cast_on_read(tiny_models, tmp_path):
    loaded = latentforge.load(
        _save(tiny_models["tiny-sdxl"], tmp_path / "m.safetensors"), dtype=torch.float16
    )
    assert {p.dtype for m in loaded.modules() for p in m.parameters()} == {torch.float16}


def test_missing_second_text_encoder_is_listed(tiny_models, tmp_path):
    model = tiny_models["tiny-sdxl"]
    sd = to_single_file_state_dict(
        model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), model.family,
        model.text_encoder_2.state_dict(),
    )  # fmt: skip
    dropped = {k: v for k, v in sd.items() if "resblocks.1." not in k}
    save_safetensors(tmp_path / "m.safetensors", dropped, {})
    with pytest.raises(CheckpointError, match=r"text_encoder_2 does not match family 'tiny-sdxl'.*missing"):
        latentforge.load(tmp_path / "m.safetensors", compute_hash=False)


def test_unet_only_sdxl_file_says_what_is_missing(tiny_models, tmp_path):
    unet = {f"model.diffusion_model.{k}": v for k, v in tiny_models["tiny-sdxl"].unet.state_dict().items()}
    save_safetensors(tmp_path / "u.safetensors", unet, {})
    with pytest.raises(UnknownArchitectureError, match="SDXL U-Net without its text encoders"):
        latentforge.load(tmp_path / "u.safetensors", compute_hash=False)
