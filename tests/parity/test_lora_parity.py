"""Our LoRA application against diffusers' `load_lora_weights` + `fuse_lora` on tiny random SD1 and SD2.

Random kohya (with LoCon conv layers) and PEFT files are written from the diffusers module names, loaded
by both, and the fused weights and U-Net / text-encoder outputs compared.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from latentforge.checkpoints import keymap_unet
from latentforge.checkpoints.lora import apply_loras
from latentforge.models.families import TINY, TINY_SD2
from references import assert_close, build_pair, write_hf_clip_vocab

RANK = 4


@pytest.fixture(scope="module", params=[TINY, TINY_SD2], ids=lambda family: family.name)
def pair(request, tmp_path_factory):
    vocab = write_hf_clip_vocab(tmp_path_factory.mktemp("vocab"))
    return build_pair(request.param, StableDiffusionPipeline, vocab)


def _targets(module: torch.nn.Module, convs: bool) -> dict[str, torch.nn.Module]:
    """Linear layers (and with `convs` the ResBlock/sampler convs, LoCon's targets) kohya trains."""
    out = {}
    for name, layer in module.named_modules():
        linear = isinstance(layer, torch.nn.Linear) and "time_embedding" not in name
        conv = convs and isinstance(layer, torch.nn.Conv2d) and name not in ("conv_in", "conv_out")
        if linear or conv:
            out[name] = layer
    return out


def _factors(layer: torch.nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = layer.weight
    down_shape = (RANK, *weight.shape[1:])  # conv: [r, in, k, k]
    up_shape = (weight.shape[0], RANK, *(1,) * (weight.ndim - 2))  # conv: [out, r, 1, 1]
    down = torch.randn(down_shape, generator=generator) * 0.3
    return down, torch.randn(up_shape, generator=generator) * 0.3


def _kohya_file(pipe, path: Path, convs: bool) -> Path:  # noqa: ANN001
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for prefix, module in (("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)):
        for name, layer in _targets(module, convs and prefix == "lora_unet_").items():
            key = prefix + name.replace(".", "_")
            down, up = _factors(layer, generator)
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK) / 2)
    save_file(tensors, path)
    return path


def _peft_file(pipe, path: Path) -> Path:  # noqa: ANN001
    generator = torch.Generator().manual_seed(2)
    tensors = {}
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.text_model.", pipe.text_encoder)):
        for name, layer in _targets(module, False).items():
            down, up = _factors(layer, generator)
            tensors |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
    save_file(tensors, path)
    return path


def _fused_reference(pipe, path: Path, unet_weight: float, te_weight: float):  # noqa: ANN001, ANN202
    """diffusers' fused U-Net and text-encoder state dicts (then unfused), and the keys it dropped."""
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(components=["unet"], lora_scale=unet_weight, adapter_names=["x"])
    pipe.fuse_lora(components=["text_encoder"], lora_scale=te_weight, adapter_names=["x"])

    def plain(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k.replace(".base_layer", ""): v.clone()
            for k, v in module.state_dict().items()
            if "lora_" not in k
        }

    unet, text = plain(pipe.unet), plain(pipe.text_encoder)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return unet, text


def _compare(ours, unet: dict, text: dict) -> None:  # noqa: ANN001
    mine = keymap_unet.ours_to_diffusers(ours.unet.state_dict(), ours.family.unet)
    assert set(mine) == set(unet)
    for key in unet:
        assert_close(mine[key], unet[key], 1e-5)
    mine = ours.text_encoder.state_dict()
    compared = 0
    for key, value in text.items():  # our SD2 text encoder also holds `text_projection`, no LoRA target
        if "position_ids" not in key:
            assert_close(mine[key if key in mine else f"text_model.{key}"], value, 1e-5)
            compared += 1
    assert compared >= 6 * ours.family.text_encoder.layers


@pytest.mark.parametrize("layout", ["kohya", "kohya-locon", "peft"])
def test_lora_matches_diffusers_fuse(pair, tmp_path, layout):
    ours, pipe = pair
    before_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = tmp_path / "lora.safetensors"
    if layout == "peft":
        _peft_file(pipe, path)
    else:
        _kohya_file(pipe, path, convs=layout == "kohya-locon")
    unet, text = _fused_reference(pipe, path, 0.7, 0.4)
    changed = {k for k in unet if not torch.equal(unet[k], before_unet[k])}
    targets = _targets(pipe.unet, layout == "kohya-locon")
    # the reference dropped none of the file's U-Net modules (and touched nothing else)
    assert changed == {f"{name}.weight" for name in targets}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module of the file must match
        handle = apply_loras(ours, [(path, 0.7, 0.4)])
    try:
        _compare(ours, unet, text)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        context = torch.randn(1, 77, ours.family.unet.context_dim, generator=torch.Generator().manual_seed(4))
        tokens = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(5))
        pipe.load_lora_weights(str(path), adapter_name="y")
        pipe.fuse_lora(components=["unet"], lora_scale=0.7, adapter_names=["y"])
        pipe.fuse_lora(components=["text_encoder"], lora_scale=0.4, adapter_names=["y"])
        with torch.no_grad():
            t = torch.tensor([500])
            assert_close(ours.unet(x, t, context), pipe.unet(x, t, context).sample, 1e-4)
            assert_close(ours.text_encoder(tokens)[0], pipe.text_encoder(tokens)[0], 1e-4)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    finally:
        handle.undo()
