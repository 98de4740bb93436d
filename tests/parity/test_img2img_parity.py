"""End-to-end img2img against diffusers' StableDiffusionImg2ImgPipeline: same tiny weights, same noise.

Step accounting differs: diffusers runs int(steps * strength) steps, A1111 (and we) int(steps * strength)
+ 1, both from the tail of a `steps`-step schedule. With 10 steps, diffusers at strength 0.6 and ours at
0.5 both run the last 6 sigmas, which the test takes from the diffusers scheduler.
The VAE posterior: we use its mean; diffusers draws a sample from the image's generator, which would
also shift the noise draws. The test gives diffusers the init latents as a 4-channel `image` (which it
uses unchanged), computed with diffusers' own preprocessing and VAE as the posterior mean, so both
sides run the same algorithm on the same inputs and diffusers' generators draw only the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest, InitImage
from latentforge.pipelines.runner import run
from references import (
    SD15_SCHEDULER,
    assert_close,
    build_pair,
    scheduler_cases,
    scheduler_sigmas,
    write_hf_clip_vocab,
)

CASES = scheduler_cases()
PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 10, 32
DIFFUSERS_STRENGTH, OUR_STRENGTH = 0.6, 0.5  # both run 6 of 10 steps


def make_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
    return coarse.resize((SIZE, SIZE), Image.BICUBIC)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import StableDiffusionImg2ImgPipeline

    return build_pair(TINY, StableDiffusionImg2ImgPipeline, write_hf_clip_vocab(tmp_path_factory.mktemp("v")))


def test_strength_mapping_runs_the_same_steps():
    from latentforge.pipelines.generate import img2img_steps

    schedule, run = img2img_steps(STEPS, OUR_STRENGTH)
    assert (schedule, run) == (STEPS, int(STEPS * DIFFUSERS_STRENGTH))
    assert img2img_steps(20, 0.75) == (20, 16)  # A1111: int(20 * 0.75) + 1
    assert img2img_steps(20, 0.75, exact_steps=True) == (26, 20)  # A1111's hires pass: int(20 / 0.75)


@pytest.mark.parametrize("sampler", list(CASES))
def test_img2img_matches_diffusers(pair, sampler):
    ours, pipe = pair
    scheduler_cls, options, _ = CASES[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = scheduler_sigmas(sampler, pipe.scheduler)
    image = make_image()
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
        init=InitImage((image,), OUR_STRENGTH),
        sigmas=tuple(sigmas.tolist()),
    )
    results = run(ours, params, progress=False)

    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        init = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    generators = [torch.Generator().manual_seed(s) for s in (SEED, SEED + 1)]
    latents = pipe(
        [PROMPT] * 2,
        image=init.expand(2, -1, -1, -1),
        strength=DIFFUSERS_STRENGTH,
        negative_prompt=[NEGATIVE] * 2,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        generator=generators,
        output_type="latent",
    ).images
    ours_latents = torch.stack([r.latents for r in results])
    assert_close(ours_latents, latents, tolerance=1e-4)


def test_init_latents_match_diffusers_encode(pair):
    """Our pixel conversion and VAE mean equal diffusers' preprocess + latent_dist.mode()."""
    from latentforge.pipelines.images import encode_images, pil_to_tensor

    ours, pipe = pair
    image = make_image(3)
    with torch.no_grad():
        reference = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode()
    assert_close(encode_images(ours, pil_to_tensor([image])), reference * TINY.latent_scale, tolerance=1e-5)
