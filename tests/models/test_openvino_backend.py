"""The openvino backend (`backends/openvino.py`): the U-Net and VAE decoder exported from our modules
match eager torch (fp32 outputs, bf16 image PSNR), the disk cache is read back, changed weights are
followed, options that patch the U-Net at run time are refused, a missing package is one clear error."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from latentforge.backends import BackendError, OpenVINOBackend, make_backend
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY, TINY_SD2, TINY_XL
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="pip install openvino (the openvino extra)"
)
pytestmark = pytest.mark.openvino  # run in a pytest process of their own (pyproject.toml)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):  # shared: a conversion takes ~10-30 s even for the tiny U-Net
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def _inputs(model: StableDiffusion, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 4, 4, generator=g)  # the shape of a 32 px txt2img with CFG below
    t = torch.tensor([999.0, 17.5])[:batch]
    context = torch.randn(batch, 77, model.family.unet.context_dim, generator=g)
    return x, t, context


@needs_openvino
def test_fp32_output_equals_eager_and_cache_is_read_back(model, cache):
    runner = OpenVINOBackend(model.unet, cache_dir=cache, precision="f32")
    x, t, context = _inputs(model)
    with torch.no_grad():
        eager = model.unet(x, t, context)
    out = runner.unet(x, t, context)
    assert out.dtype == torch.float32 and out.shape == eager.shape
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-5 * eager.abs().max().item())
    assert runner.seconds["convert"] > 0 and len(list(cache.glob("unet-*.xml"))) == 1
    assert runner.decode(model.vae, x) is None  # no VAE was given: decoding stays eager
    again = OpenVINOBackend(model.unet, cache_dir=cache, precision="f32")  # a later process
    torch.testing.assert_close(again.unet(x, t, context), out, rtol=0, atol=0)
    assert again.seconds["read"] > 0 and again.seconds["convert"] == again.seconds["export"] == 0


@needs_openvino
def test_changed_weights_are_followed(model, cache):
    unet = StableDiffusion.from_family(TINY).unet.eval()
    unet.load_state_dict(model.unet.state_dict())
    runner = OpenVINOBackend(unet, cache_dir=cache, precision="f32")
    x, t, context = _inputs(model)
    before = runner.unet(x, t, context)  # the same weights as `model`'s: read from the cache
    with torch.no_grad():
        unet.out[2].bias += 0.5  # in place, as a LoRA patch or a merge writes
        eager = unet(x, t, context)
    after = runner.unet(x, t, context)
    torch.testing.assert_close(after, eager, rtol=0, atol=1e-4)
    assert (after - before).abs().mean() > 0.4
    assert runner.seconds["read"] > 0 and runner.seconds["convert"] > 0
    assert len(list(cache.glob("unet-*.xml"))) == 2


@needs_openvino
def test_sd2_layout_and_bf16_weights(tmp_path):
    torch.manual_seed(0)
    sd2 = StableDiffusion.from_family(TINY_SD2, dtype=torch.bfloat16).eval()  # linear proj, bf16 weights
    with pytest.raises(BackendError, match="f32 precision needs fp32 weights"):
        OpenVINOBackend(sd2.unet, precision="f32")
    runner = OpenVINOBackend(sd2.unet, cache_dir=tmp_path)
    assert runner.precision == "bf16"
    x, t, context = _inputs(sd2)
    with torch.no_grad():
        eager = sd2.unet(x.bfloat16(), t, context.bfloat16()).float()
    out = runner.unet(x, t, context)
    # bf16 weights and activations on both sides, rounded in different places: measured 0.06 of 1.06
    assert (out - eager).abs().max() < 0.1 * eager.abs().max()
    assert (out - eager).abs().mean() < 0.01 * eager.abs().max()


@needs_openvino
def test_sdxl_vector_conditioning(tmp_path):
    torch.manual_seed(0)
    xl = StableDiffusion.from_family(TINY_XL).eval()
    runner = OpenVINOBackend(xl.unet, cache_dir=tmp_path, precision="f32")
    x, t, context = _inputs(xl)
    y = torch.randn(2, TINY_XL.unet.adm_in_channels, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = xl.unet(x, t, context, y)
    tolerance = 2e-5 * eager.abs().max().item()
    torch.testing.assert_close(runner.unet(x, t, context, y), eager, rtol=0, atol=tolerance)


@needs_openvino
def test_bf16_image_psnr_against_eager(model, cache):
    request = GenerationRequest(prompt="a cat", steps=8, seed=1, width=32, height=32, sampler="Euler")
    plain = np.asarray(run(model, request, progress=False)[0].image)
    bf16 = OpenVINOBackend(model.unet, model.vae, model.text_encoder, cache_dir=cache, precision="bf16")
    image = np.asarray(run(replace(model, backend=bf16), request, progress=False)[0].image)
    f32 = OpenVINOBackend(model.unet, model.vae, model.text_encoder, cache_dir=cache, precision="f32")
    exact = np.asarray(run(replace(model, backend=f32), request, progress=False)[0].image)
    assert len(f32.decoder_graph.compiled) == 1 and list(f32.text_encoder.graphs) == [1]  # all ran compiled
    # measured 2026-12-06: bf16 48.6 dB (at most 5 grey levels off), f32 identical, against eager fp32
    assert 40 < _psnr(plain, image) < _psnr(plain, exact)
    assert np.abs(plain.astype(int) - exact.astype(int)).max() <= 1


@needs_openvino
@pytest.mark.parametrize(
    "options",
    [{"deepcache_interval": 2}, {"token_merging_ratio": 0.5}],
)
def test_run_time_patches_are_refused(model, options):
    compiled = replace(model, backend=OpenVINOBackend(model.unet, cache_dir=None))
    request = GenerationRequest(prompt="a cat", steps=2, seed=1, width=32, height=32, **options)
    with pytest.raises(ParameterError, match="not available with --backend openvino"):
        run(compiled, request, progress=False)


@needs_openvino
def test_text_encoder_equals_eager_and_falls_back_for_embeddings(model, cache):
    from latentforge.prompts.conditioning import encode_prompts

    backend = OpenVINOBackend(model.unet, text_encoder=model.text_encoder, cache_dir=cache, precision="f32")
    encoder = backend.text_encoder_for(model.text_encoder)
    assert backend.text_encoder_for(StableDiffusion.from_family(TINY).text_encoder) is not encoder  # swapped
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73, [49406, 49407] + [0] * 75])
    with torch.no_grad():
        for skip in (1, 2):
            hidden, pooled = model.text_encoder(ids, clip_skip=skip)
            got_hidden, got_pooled = encoder(ids, clip_skip=skip)
            torch.testing.assert_close(got_hidden, hidden, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-5)
        assert sorted(encoder.graphs) == [1, 2]
        embeds = torch.randn(2, 77, model.family.text_encoder.width)  # textual inversion: eager, exact
        fallback = encoder(ids, token_embeds=embeds)[0]
        assert torch.equal(fallback, model.text_encoder(ids, token_embeds=embeds)[0])
        # unweighted: a fresh encoder's outputs have mean ~0, where A1111's mean restoring of weighted
        # prompts divides rounding noise by rounding noise
        prompt = ["a red cat, BREAK sitting"]
        eager = encode_prompts(model.text_encoder, model.tokenizer, prompt)
        torch.testing.assert_close(encode_prompts(encoder, model.tokenizer, prompt), eager, rtol=0, atol=1e-5)


@needs_openvino
def test_lora_tags_on_the_unet_are_refused(model, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    prefix = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q"
    tensors = {f"{prefix}.lora_down.weight": torch.randn(4, 32, generator=g)}
    tensors[f"{prefix}.lora_up.weight"] = torch.randn(32, 4, generator=g)
    tensors[f"{prefix}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "x.safetensors")
    compiled = replace(model, backend=OpenVINOBackend(model.unet, cache_dir=None), lora_dirs=(tmp_path,))
    before = [p.clone() for p in model.unet.parameters()]
    request = GenerationRequest(prompt="a cat <lora:x:1>", steps=2, seed=1, width=32, height=32)
    with pytest.raises(ParameterError, match="<lora:> tags on the U-Net"):
        run(compiled, request, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.unet.parameters(), strict=True))  # undone


def test_unknown_backend_and_missing_package(model, monkeypatch):
    with pytest.raises(BackendError, match="choose one of torch, openvino"):
        make_backend("onnx", model.unet)
    assert make_backend("torch", model.unet) is None
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'latentforge\[openvino\]'"):
        make_backend("openvino", model.unet)


def test_cli_missing_package_is_one_error_line(tmp_path, monkeypatch, capsys):
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.cli import main

    torch.manual_seed(0)
    tiny = StableDiffusion.from_family(TINY)
    path = tmp_path / "tiny.safetensors"
    parts = (tiny.unet.state_dict(), tiny.vae.state_dict(), tiny.text_encoder.state_dict())
    save_single_file(path, *parts, TINY)
    monkeypatch.setitem(sys.modules, "openvino", None)
    argv = ["generate", "x", "--model", str(path), "--steps", "1", "--out", str(tmp_path / "out")]
    assert main([*argv, "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --backend openvino needs the openvino package") and "\n" not in err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True
