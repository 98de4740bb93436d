"""int8 weight-only storage: the per-channel rounding bound, layer equivalence, image PSNR on a
random-weight model, and the memory of an SD1.5-size U-Net (built on meta)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentforge.model import StableDiffusion
from latentforge.models.families import FAMILIES, SD1, TINY
from latentforge.models.quantize import (
    Int8Conv2d,
    Int8Linear,
    quantizable,
    quantize_int8,
    quantize_per_channel,
)
from latentforge.models.unet import UNetModel
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run


def test_rounding_bound_and_layers():
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 1, 16)[:, None, None, None]  # very unequal channels
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (w - q.float() * scale[:, None, None, None]).abs().flatten(1).amax(1)
    assert (error <= scale / 2 * (1 + 1e-6)).all()  # round-to-nearest: half a step per channel
    conv, linear = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(8, 16)
    x = torch.randn(2, 8, 5, 5)
    for layer, int8, call in (
        (conv, Int8Conv2d(conv), lambda w, b: F.conv2d(x, w, b, padding=1)),
        (linear, Int8Linear(linear), lambda w, b: F.linear(x.transpose(1, 3), w, b)),
    ):
        arg = x if isinstance(layer, nn.Conv2d) else x.transpose(1, 3)
        dequantized = int8.weight.float() * int8.weight_scale.view(-1, *([1] * (int8.weight.ndim - 1)))
        torch.testing.assert_close(int8(arg), call(dequantized, layer.bias), rtol=0, atol=1e-6)
        relative = (int8(arg) - layer(arg)).norm() / layer(arg).norm()
        assert 1e-5 < relative < 2e-2


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_image_psnr_on_random_weights():
    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY).eval()
    quantized = replace(model, unet=copy.deepcopy(model.unet))
    assert quantize_int8(quantized.unet, min_params=256) > 10
    request = GenerationRequest(prompt="a cat", steps=8, seed=1, width=32, height=32, sampler="Euler")
    plain = np.asarray(run(model, request, progress=False)[0].image)
    int8 = np.asarray(run(quantized, request, progress=False)[0].image)
    # measured 2026-12-06: 58.0 dB with 100 layers quantized (8 Euler steps); 40 dB is ~1 grey level
    assert 40 < _psnr(plain, int8) < math.inf


def test_sd15_unet_memory_on_meta():
    with torch.device("meta"):
        unet = UNetModel(SD1.unet).to(torch.bfloat16)
    bf16 = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
    quantize_int8(unet)
    int8 = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
    # measured: 1639 MiB -> 866 MiB (0.53: norms, biases, 1x1 and in/out convs stay bf16)
    assert bf16 / 2**30 > 1.5 and int8 / bf16 < 0.55, (bf16, int8)


def test_cli_int8(tiny_checkpoint, tmp_path):
    from latentforge.cli import main

    argv = ["generate", "a cat", "--model", str(tiny_checkpoint), "--size", "32x32", "--steps", "2"]
    assert main([*argv, "--int8", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1


def _whole_tensor_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula on the whole tensor at once (quantize_per_channel before it went blockwise)."""
    w = weight.float()
    scale = w.flatten(1).abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (w / scale.view(-1, *([1] * (w.ndim - 1)))).round().clamp(-127, 127).to(torch.int8), scale


def test_blockwise_quantization_equals_whole_tensor(monkeypatch):
    import latentforge.models.quantize as quantize

    monkeypatch.setattr(quantize, "_CHUNK", 100)  # blocks of 1-2 rows: every block boundary is crossed
    torch.manual_seed(0)
    for w in (torch.randn(37, 8, 3, 3).bfloat16(), torch.randn(50, 61), torch.randn(5, 300).half()):
        q, scale = quantize_per_channel(w)
        q_ref, scale_ref = _whole_tensor_reference(w)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        q_via, scale_via = quantize_per_channel(w, via=torch.bfloat16)  # cast block by block on the way
        q_ref, scale_ref = _whole_tensor_reference(w.bfloat16())
        assert torch.equal(q_via, q_ref) and torch.equal(scale_via, scale_ref)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_load_rule_picks_the_layers_quantize_int8_replaces(name):
    """An int8 load decides per tensor by shape (`quantizable`) what `quantize_int8` decides per module:
    the two must pick the same U-Net weights in every family of the table."""
    from latentforge.checkpoints.assembly import SkipInitOnMeta

    with torch.device("meta"), SkipInitOnMeta():
        unet = UNetModel(FAMILIES[name].unet)
    by_shape = {k for k, v in unet.state_dict().items() if k.endswith(".weight") and quantizable(v.shape)}
    assert quantize_int8(unet) == len(by_shape) > 0
    assert {k.removesuffix("_scale") for k in unet.state_dict() if k.endswith(".weight_scale")} == by_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_load_equals_quantize_after_load(tiny_checkpoint, dtype):
    from latentforge.model import load

    after = load(tiny_checkpoint, dtype=dtype, compute_hash=False)
    assert quantize_int8(after.unet) > 0
    during = load(tiny_checkpoint, dtype=dtype, compute_hash=False, int8=True)
    expected, got = after.unet.state_dict(), during.unet.state_dict()
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert [type(m) for m in during.unet.modules()] == [type(m) for m in after.unet.modules()]
    for part in ("vae", "text_encoder"):  # untouched
        a, b = getattr(after, part).state_dict(), getattr(during, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_int8_load_of_a_ckpt(tiny_checkpoint, tmp_path):
    """The pickle reader quantizes on read too: the same tensors as quantizing after the load."""
    from latentforge.checkpoints.reading import read_state_dict
    from latentforge.model import load

    state_dict, _ = read_state_dict(tiny_checkpoint)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state_dict}, ckpt)
    reference = load(tiny_checkpoint, compute_hash=False)
    quantize_int8(reference.unet)
    expected = reference.unet.state_dict()
    got = load(ckpt, compute_hash=False, int8=True).unet.state_dict()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in expected.items())
    assert got.keys() == expected.keys()
