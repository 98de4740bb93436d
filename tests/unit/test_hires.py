"""Hires fix: target sizes as A1111, the latent upscaler, step accounting, seeds and infotext."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.generate import LatentSource, sample_latents
from latentforge.pipelines.hires import upscale_latents
from latentforge.pipelines.infotext import parse_infotext
from latentforge.pipelines.request import (
    UPSCALERS,
    GenerationRequest,
    Hires,
    hires_size,
    resolve,
    upscaler_name,
)
from latentforge.pipelines.request_infotext import from_infotext
from latentforge.pipelines.runner import run

PARAMS = GenerationRequest(
    prompt="a cat", steps=3, sampler="Euler", seed=11, width=32, height=32, cfg_scale=4
)


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def test_target_sizes_follow_a1111():
    assert hires_size(512, 768, scale=1.5) == ((768, 1152), (768, 1152))
    assert hires_size(512, 768, scale=2, resize_width=1024) == ((1024, 1536), (1024, 1536))
    assert hires_size(512, 768, scale=2, resize_height=1024) == ((682, 1024), (682, 1024))
    # both sides with another aspect ratio: upscale to cover, crop the excess
    assert hires_size(512, 512, scale=2, resize_width=1024, resize_height=768) == ((1024, 1024), (1024, 768))


def test_latent_upscaler_is_bilinear_without_antialias(model):
    latents = torch.randn(2, 4, 8, 8)
    up = upscale_latents(model, latents, "latent", (32, 32), (32, 32))
    assert torch.equal(up, F.interpolate(latents, size=(16, 16), mode="bilinear", antialias=False))
    cropped = upscale_latents(model, latents, "Latent (nearest)", (32, 32), (32, 24))
    assert torch.equal(cropped, F.interpolate(latents, size=(16, 16), mode="nearest")[:, :, 2:14])
    assert upscaler_name("LANCZOS") == "Lanczos" and "Latent" in UPSCALERS
    with pytest.raises(ParameterError, match="valid: Latent"):
        upscaler_name("Latent (bogus)")
    with pytest.warns(UserWarning, match="'R-ESRGAN 4x\\+' is not available here; using Lanczos"):
        assert upscaler_name("R-ESRGAN 4x+") == "Lanczos"


def test_hires_is_txt2img_then_exact_img2img_with_the_same_seeds(model):
    steps: list[int] = []
    request = replace(PARAMS, batch_size=2, hires=Hires(scale=2, steps=2, denoising_strength=0.6))
    results = run(model, request, callback=lambda info: steps.append(info.i), progress=False)
    assert len(steps) == 3 + 2  # first pass, then exactly hires_steps (A1111's hires accounting)
    base = run(model, replace(PARAMS, batch_size=2), progress=False)
    first = torch.stack([r.latents for r in base])
    resolved = resolve(replace(PARAMS, batch_size=2, width=64, height=64, steps=2), model)
    source = LatentSource(F.interpolate(first, size=(32, 32), mode="bilinear"))
    expected = sample_latents(
        model, resolved.request, resolved.first, resolved.batches[0], source=source, strength=0.6,
        exact_steps=True,
    )  # fmt: skip
    assert torch.allclose(torch.stack([r.latents for r in results]), expected, atol=1e-6)
    assert [r.image.size for r in results] == [(64, 64)] * 2 and [r.seed for r in results] == [11, 12]


def test_infotext_is_a1111s_and_reads_back(model):
    hires = Hires(scale=1.5, steps=2, upscaler="Lanczos")
    result = run(model, replace(PARAMS, hires=hires), progress=False)[0]
    assert result.image.size == (48, 48)
    _, _, values = parse_infotext(result.infotext)
    assert values["Size"] == "32x32" and values["Hires upscale"] == "1.5" and values["Hires steps"] == "2"
    assert values["Hires upscaler"] == "Lanczos" and values["Denoising strength"] == "0.7"
    assert from_infotext(result.infotext).request.hires == hires
    assert from_infotext(result.infotext).request == result.request


def test_targets_that_do_not_fit_the_vae_are_rejected(model):
    with pytest.raises(ParameterError, match="nearest valid"):
        run(model, replace(PARAMS, hires=Hires(scale=1.47)), progress=False)
    for scale in (0, float("inf"), float("nan")):
        with pytest.raises(ParameterError, match="hires scale must be a finite number in"):
            run(model, replace(PARAMS, hires=Hires(scale=scale)), progress=False)
