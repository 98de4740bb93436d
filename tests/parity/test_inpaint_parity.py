"""9-channel inpainting against diffusers' StableDiffusionInpaintPipeline on a tiny 9-channel model.

Both feed the U-Net [latents, mask, masked-image latents] (white = repaint). Differences handled:
  - A1111 (and we by default) also blend x0 with the init latents outside the mask after every step;
    diffusers does that only for 4-channel U-Nets, so this test runs ours with latent_blend=False.
  - Strength: 10 steps at strength 0.5 (ours, A1111) and 0.6 (diffusers) both run the last 6 sigmas.
  - VAE posterior: ours uses the mean, diffusers a generator sample; the test hands diffusers the
    starting latents (init mean + seed noise * first sigma) and the masked-image latents (posterior
    mean of the masked image, from diffusers' own preprocessing and VAE).
The 4-channel (blending) algorithm differs from diffusers' and is tested in tests/unit/test_inpaint.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from test_img2img_parity import make_image

from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest, InitImage, Inpaint
from latentforge.pipelines.runner import run
from latentforge.sampling.noise import initial_noise
from references import SD15_SCHEDULER, assert_close, build_pair, scheduler_cases, write_hf_clip_vocab

TINY_INPAINT = replace(TINY, name="tiny-inpaint", unet=replace(TINY.unet, in_channels=9))
CASES = {k: v for k, v in scheduler_cases().items() if k != "DDIM"}
PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 4321, 10, 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import StableDiffusionInpaintPipeline

    vocab = write_hf_clip_vocab(tmp_path_factory.mktemp("v"))
    return build_pair(TINY_INPAINT, StableDiffusionInpaintPipeline, vocab)


def make_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (6, 10, 22, 26))  # white = repaint
    return mask


@pytest.mark.parametrize("sampler", list(CASES))
def test_9_channel_inpaint_matches_diffusers(pair, sampler):
    ours, pipe = pair
    scheduler_cls, options, variance_preserving = CASES[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    image, mask = make_image(1), make_mask()
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
        init=InitImage((image,), 0.5),
        inpaint=Inpaint(mask=mask, mask_blur=0, latent_blend=False),
        sigmas=tuple(sigmas.tolist()),
    )
    results = run(ours, params, progress=False)

    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        binary = pipe.mask_processor.preprocess(mask)
        init = pipe.vae.encode(pixels).latent_dist.mode() * scale
        masked = pipe.vae.encode(pixels * (binary < 0.5)).latent_dist.mode() * scale
    generators = [torch.Generator().manual_seed(s) for s in (SEED, SEED + 1)]
    noise = initial_noise(generators, tuple(init.shape[1:]))  # advances the generators past it
    first = sigmas[4].float()  # 6 of 10 steps run
    start = init + noise * first  # ours: x = x0 + sigma * eps
    start = start / (first**2 + 1).sqrt() if variance_preserving else start / pipe.scheduler.init_noise_sigma
    latents = pipe(
        [PROMPT] * 2,
        image=image,
        mask_image=mask,
        masked_image_latents=masked.expand(2, -1, -1, -1),
        latents=start,
        strength=0.6,
        negative_prompt=[NEGATIVE] * 2,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        height=SIZE,
        width=SIZE,
        generator=generators,
        output_type="latent",
    ).images
    assert_close(torch.stack([r.latents for r in results]), latents, tolerance=1e-4)
