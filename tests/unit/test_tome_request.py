"""ToMe as a request option: it changes the image, ratio 0 and the undo leave the model exact, the
random partition follows the seed, and bad values are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.models.unet import BasicTransformerBlock
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run

PARAMS = GenerationRequest(
    prompt="a cat", negative_prompt="dog", steps=3, seed=5, width=32, height=32, sampler="Euler"
)


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def _latents(model: StableDiffusion, request: GenerationRequest) -> torch.Tensor:
    return run(model, request, progress=False)[0].latents


def test_tome_in_generation(model):
    plain = _latents(model, PARAMS)
    assert torch.equal(_latents(model, replace(PARAMS, token_merging_ratio=0.0)), plain)
    merged = _latents(model, replace(PARAMS, token_merging_ratio=0.5, token_merging_max_downsample=8))
    assert not torch.equal(merged, plain)
    assert all(m.token_merging is None for m in model.unet.modules() if isinstance(m, BasicTransformerBlock))
    assert not model.unet._forward_pre_hooks  # the size hook is gone too
    assert torch.equal(_latents(model, PARAMS), plain)
    random = replace(
        PARAMS, token_merging_ratio=0.5, token_merging_max_downsample=8, token_merging_random=True
    )
    assert torch.equal(_latents(model, random), _latents(model, random))  # seeded, not the global RNG
    assert not torch.equal(_latents(model, random), merged)


@pytest.mark.parametrize(
    "change",
    [{"token_merging_ratio": 0.8}, {"token_merging_ratio": -0.1}, {"token_merging_max_downsample": 3}],
)
def test_bad_values(model, change):
    with pytest.raises(ParameterError, match="token merging"):
        run(model, replace(PARAMS, **change), progress=False)
