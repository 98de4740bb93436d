"""DeepCache end to end against the `deepcache` package: our txt2img with `deepcache_interval`/`_branch`
equals diffusers' StableDiffusionPipeline under `DeepCacheSDHelper` (same tiny random weights, same noise,
CFG 7), and interval 1 is the plain path bit for bit.

The tiny family gets two ResBlocks per level (SD's layout), so the package's `cache_branch_id`
(3 * block + layer) and our branch (the depth in `input_blocks`) name the same blocks.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import StableDiffusionPipeline

from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from references import (
    SD15_SCHEDULER,
    assert_close,
    build_pair,
    diffusers_start,
    scheduler_cases,
    write_hf_clip_vocab,
)

FAMILY = replace(TINY, unet=replace(TINY.unet, num_res_blocks=2))  # 6 input blocks: branches 0..5
PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 7, 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(FAMILY, StableDiffusionPipeline, write_hf_clip_vocab(tmp_path_factory.mktemp("vocab")))


def _ours(model, sampler: str, sigmas: torch.Tensor, **deepcache) -> torch.Tensor:  # noqa: ANN001
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampler=sampler,
        steps=STEPS,
        cfg_scale=7.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        batch_size=2,
        sigmas=tuple(sigmas.tolist()),
        **deepcache,
    )
    return torch.stack([r.latents for r in run(model, request, progress=False)])


def _theirs(pipe, sampler: str, sigmas: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    generators, start = diffusers_start(FAMILY, sampler, sigmas, pipe.scheduler, (SEED, SEED + 1), SIZE)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=2,
        generator=generators,
        latents=start,
        output_type="latent",
    ).images


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler"])
@pytest.mark.parametrize(("interval", "branch"), [(2, 0), (3, 0), (2, 1), (3, 2), (2, 3), (3, 5)])
def test_deepcache_matches_the_package(pair, sampler, interval, branch):
    ours, pipe = pair
    scheduler_cls, options, _ = scheduler_cases()[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        expected = _theirs(pipe, sampler, sigmas)
    finally:
        helper.disable()
    plain = _ours(ours, sampler, sigmas)
    cached = _ours(ours, sampler, sigmas, deepcache_interval=interval, deepcache_branch=branch)
    assert_close(cached, expected, tolerance=1e-4)
    assert (cached - plain).abs().max() > 1e-3 * plain.abs().max()  # the cache changed the result
    assert torch.equal(_ours(ours, sampler, sigmas, deepcache_interval=1, deepcache_branch=branch), plain)
