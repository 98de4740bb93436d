"""`latentforge info` on SDXL files: both encoders of a base (CLIP-L and bigG, with bigG's pooled projection),
the refiner's single bigG encoder, every component's parameter count; an SDXL LoRA holding only `lora_te1_` /
`lora_te2_` modules is reported as a LoRA file."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from latentforge.cli import main
from latentforge.models.families import TINY_XL, TINY_XL_REFINER
from references import save_random_model


def _millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters"


def test_info_reports_both_sdxl_encoders(tmp_path, capsys):
    model = save_random_model(TINY_XL, tmp_path / "base.safetensors")
    assert main(["info", str(tmp_path / "base.safetensors")]) == 0
    out = capsys.readouterr().out
    l_config, g_config = TINY_XL.text_encoder, TINY_XL.text_encoder_2
    assert f"text encoder (CLIP-L): {l_config.layers} layers, width {l_config.width}\n" in out
    assert (
        f"text encoder 2 (OpenCLIP bigG): {g_config.layers} layers, width {g_config.width}, "
        f"pooled projection {g_config.projection_dim}\n"
    ) in out
    assert f"default clip skip: {TINY_XL.default_clip_skip}" in out
    assert f"text_encoder: {_millions(model.text_encoder)}" in out
    assert f"text_encoder_2: {_millions(model.text_encoder_2)}" in out
    assert "family: tiny-sdxl\n" in out


def test_info_reports_the_refiners_single_encoder(tmp_path, capsys):
    model = save_random_model(TINY_XL_REFINER, tmp_path / "refiner.safetensors")
    assert main(["info", str(tmp_path / "refiner.safetensors")]) == 0
    out = capsys.readouterr().out
    g_config = TINY_XL_REFINER.text_encoder
    assert f"text encoder (OpenCLIP bigG): {g_config.layers} layers, width {g_config.width}" in out
    assert "text encoder 2" not in out and "text_encoder_2" not in out and "CLIP-L" not in out
    assert f"text_encoder: {_millions(model.text_encoder)}" in out


def test_info_on_a_text_encoder_only_sdxl_lora(tmp_path, capsys):
    path = tmp_path / "te.safetensors"
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 8), f"{name}.lora_up.weight": torch.zeros(8, 4)}, path
    )
    assert main(["info", str(path)]) == 0
    assert "LoRA file: 1 modules, ranks [4]" in capsys.readouterr().out
