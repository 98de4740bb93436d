"""SDXL adapters: the full-size kohya SDXL LoRA inventory lands on our weights, LoRAs of another family are
refused naming both families with the model unchanged, the refiner takes `lora_te2_`, and `clip_l`/`clip_g`
embeddings load per encoder (another family's skipped with a warning) and are recorded in `TI hashes`."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from safetensors.torch import save_file

from latentforge.checkpoints.embeddings import write_embedding
from latentforge.checkpoints.keymap_unet import diffusers_config
from latentforge.checkpoints.lora import (
    TEXT,
    TEXT2,
    UNET,
    LoraFamilyError,
    _lookup_tables,
    _model_component,
    _split_key,
    apply_loras,
)
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import SD1, SDXL, TINY_XL, TINY_XL_REFINER
from latentforge.pipelines.adapters import embedding_hashes
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from references import transformers_text_config


def _diffusers_name(key: str) -> str:
    """A module name diffusers' kohya converter gives (processor-style for attention) -> its module."""
    key = key.removeprefix("unet.")
    if match := re.search(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$", key):
        return key[: match.start()] + "." + ("to_out.0" if match[1] == "to_out" else match[1])
    return key.removesuffix(".lora.down.weight")


def test_full_size_kohya_sdxl_inventory_maps_onto_our_weights():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config(SDXL.unet))
        te1 = CLIPTextModel(transformers_text_config(SDXL.text_encoder))
        te2 = CLIPTextModelWithProjection(transformers_text_config(SDXL.text_encoder_2))
    ours = StableDiffusion.from_family(SDXL, device="meta")
    # the modules sd-scripts' SDXL LoRA wraps: Linears of Transformer2DModel ("create LoRA for U-Net: 722")
    attention = {
        f"{owner}.{child}"
        for owner, module in reference.named_modules()
        if type(module).__name__ == "Transformer2DModel"
        for child, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear)
    }
    assert len(attention) == 722
    # kohya spells them in sgm's original names (sdxl_original_unet.py): ours, underscored
    kohya = {
        "lora_unet_" + name.replace(".", "_"): layer.weight.shape
        for name, layer in ours.unet.named_modules()
        if isinstance(layer, torch.nn.Linear)
        and (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out")))
    }
    # diffusers' own kohya converter takes exactly these names onto exactly the 722 modules
    factors = {f"{k}.{f}": torch.zeros(1) for k in kohya for f in ("lora_down.weight", "lora_up.weight")}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(factors, reference.config)
    )
    downs = {_diffusers_name(k) for k in converted if k.startswith("unet.") and ".up." not in k}
    downs = {name for name in downs if not name.endswith("up.weight")}
    assert downs == attention
    for prefix, text in (("lora_te1_", te1), ("lora_te2_", te2)):  # 72 and 192 modules, as sd-scripts prints
        names = {
            prefix + name.replace(".", "_"): layer.weight.shape
            for name, layer in text.named_modules()
            if isinstance(layer, torch.nn.Linear) and ".layers." in name
        }
        assert len(names) == (72 if prefix == "lora_te1_" else 192)
        kohya |= names
    tables = _lookup_tables(
        SDXL,
        {n.rsplit(".", 1)[0] for n, _ in ours.text_encoder.named_parameters()},
        {n.rsplit(".", 1)[0] for n, _ in ours.text_encoder_2.named_parameters()},
    )
    params = {
        UNET: dict(ours.unet.named_parameters()),
        TEXT: dict(ours.text_encoder.named_parameters()),
        TEXT2: dict(ours.text_encoder_2.named_parameters()),
    }
    landed = set()
    for name, shape in kohya.items():
        component, source, _ = _split_key(f"{name}.lora_down.weight")
        into = _model_component(SDXL, component)
        target = tables[into].get(source)
        assert target is not None, name
        assert params[into][f"{target}.weight"].shape == shape, name
        landed.add((into, target))
    assert len(landed) == 722 + 72 + 192


def _lora(path, modules: dict[str, tuple[int, int]]):  # noqa: ANN001, ANN202
    """A kohya file with one random LoRA module per (name -> (in, out))."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, (fan_in, fan_out) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, fan_in, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, 4, generator=g)
    save_file(tensors, str(path))
    return path


def test_another_familys_lora_is_refused_naming_both(tmp_path):
    xl = StableDiffusion.from_family(TINY_XL)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in xl.modules()]
    # an SD1.5 LoRA: diffusers-named U-Net with 768-wide cross-attention keys, and `lora_te_`
    sd1 = _lora(
        tmp_path / "sd1.safetensors",
        {
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (768, 640),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        },
    )
    with pytest.raises(LoraFamilyError, match=r"SD1 LoRA and the model is SDXL \('tiny-sdxl'\)"):
        apply_loras(xl, [(sd1, 1.0, 1.0)])
    for module, saved in zip(xl.modules(), before, strict=True):
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
    # an SDXL LoRA on SD1.5 (checked before any weight is touched, so a meta model will do)
    sd15 = StableDiffusion.from_family(SD1, device="meta")
    te_only = _lora(
        tmp_path / "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1": (1280, 5120)}
    )
    with pytest.raises(LoraFamilyError, match=r"SDXL LoRA and the model is SD1 \('sd1'\)"):
        apply_loras(sd15, [(te_only, 1.0, 1.0)])
    unet = _lora(
        tmp_path / "xl_unet.safetensors",
        {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640)},
    )
    with pytest.raises(LoraFamilyError, match="SDXL LoRA and the model is SD1"):
        apply_loras(sd15, [(unet, 1.0, 1.0)])


def test_refiner_takes_te2_and_skips_te1(tmp_path):
    refiner = StableDiffusion.from_family(TINY_XL_REFINER)
    width = TINY_XL_REFINER.text_encoder.width
    path = _lora(
        tmp_path / "r.safetensors",
        {
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (width, width),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (TINY_XL.text_encoder.width,) * 2,
        },
    )
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    before = refiner.text_encoder.state_dict()[name].clone()
    with pytest.warns(UserWarning, match="lora_te1_|text_model_encoder_layers_0_self_attn_q_proj"):
        handle = apply_loras(refiner, [(path, 1.0, 1.0)])
    assert not torch.equal(refiner.text_encoder.state_dict()[name], before)
    assert handle.reports[0].unmatched == ["text_model_encoder_layers_0_self_attn_q_proj"]
    handle.undo()
    assert torch.equal(refiner.text_encoder.state_dict()[name], before)


def test_embeddings_of_another_family_are_refused_or_skipped(tmp_path):
    xl = StableDiffusion.from_family(SDXL, device="meta")
    sd15 = StableDiffusion.from_family(SD1, device="meta")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_embedding(folder / "sd1emb.pt", "sd1emb", torch.randn(2, 768))
    both = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    write_embedding(folder / "xlemb.safetensors", "xlemb", both)
    with pytest.raises(
        ParameterError, match=r"is for SD1 \(width 768\); this sdxl-base model's text encoders"
    ):
        xl.load_embedding(folder / "sd1emb.pt")
    with pytest.raises(ParameterError, match=r"is for SDXL \(width 2048\); this sd1 model"):
        sd15.load_embedding(folder / "xlemb.safetensors")
    for model, kept, skipped in ((xl, "xlemb", "SD1"), (sd15, "sd1emb", "SDXL")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.use_folders(embedding_dirs=[folder])
        assert list(model.embeddings) == [kept]
        assert len(caught) == 1 and f"is for {skipped}" in str(caught[0].message)
    # the refiner reads `clip_g` alone; parts of unequal token counts are refused
    refiner = StableDiffusion.from_family(TINY_XL_REFINER, device="meta")
    parts = {"clip_l": torch.randn(1, 16), "clip_g": torch.randn(1, TINY_XL_REFINER.text_encoder.width)}
    assert refiner.load_embedding(write_embedding(tmp_path / "r.safetensors", "r", parts)).count == 1
    tiny = StableDiffusion.from_family(TINY_XL, device="meta")
    uneven = {"clip_l": torch.randn(1, 16), "clip_g": torch.randn(2, TINY_XL.text_encoder_2.width)}
    with pytest.raises(ParameterError, match="clip_l width 16 \\+ clip_g width"):
        tiny.load_embedding(write_embedding(tmp_path / "u.safetensors", "u", uneven))


def test_sdxl_embedding_changes_both_encoders_and_is_in_ti_hashes(tmp_path):
    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY_XL).eval()
    vectors = {
        "clip_l": torch.randn(2, TINY_XL.text_encoder.width) * 3,
        "clip_g": torch.randn(2, TINY_XL.text_encoder_2.width) * 3,
    }
    embedding = model.load_embedding(write_embedding(tmp_path / "sksxl.safetensors", "sksxl", vectors))
    prompt = "a photo of sksxl"
    assert embedding_hashes(model, [prompt], 4) == f"sksxl: {embedding.hash}"
    request = GenerationRequest(prompt=prompt, steps=2, seed=1, width=32, height=32, sampler="Euler")
    (result,) = run(model, request, progress=False)
    assert f'TI hashes: "sksxl: {embedding.hash}"' in result.infotext
