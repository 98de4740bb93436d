"""End-to-end txt2img against diffusers' StableDiffusionPipeline: same tiny random weights, same seeds.

Both sides run the same sigmas (taken from the diffusers scheduler), per-image CPU generators, CFG 7
and a negative prompt. diffusers multiplies given latents by its `init_noise_sigma`, and starts step
noise after the initial draw; the test hands it the initial noise our pipeline draws, pre-divided, and
generators that have already made that draw, so both runs see the same random numbers.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    StableDiffusionPipeline,
)

from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from references import (
    SD15_SCHEDULER,
    assert_close,
    build_pair,
    diffusers_start,
    scheduler_cases,
    scheduler_sigmas,
    write_hf_clip_vocab,
)

CASES = scheduler_cases()
PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 6, 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(TINY, StableDiffusionPipeline, write_hf_clip_vocab(tmp_path_factory.mktemp("vocab")))


@pytest.mark.parametrize("sampler", list(CASES))
def test_txt2img_matches_diffusers(pair, sampler):
    ours, pipe = pair
    scheduler_cls, options, _ = CASES[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler_sigmas(sampler, scheduler)
    params = GenerationRequest(
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
    )
    results = run(ours, params, progress=False)

    generators, start = diffusers_start(TINY, sampler, sigmas, scheduler, (SEED, SEED + 1), SIZE)
    latents = pipe(
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
    ours_latents = torch.stack([r.latents for r in results])
    assert_close(ours_latents, latents, tolerance=1e-4)
