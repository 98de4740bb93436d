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
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.generate import generate
from latentforge.pipelines.params import GenerationParams
from latentforge.sampling.noise import initial_noise
from latentforge.sampling.registry import get_sampler
from references import assert_close, diffusers_vae_config, transformers_text_config, write_hf_clip_vocab

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# (scheduler, options, whether its latents are variance-preserving: x_vp = x / sqrt(1 + sigma^2))
CASES = {
    # set_alpha_to_one=True ends DDIM at sigma 0, which is what our DDIM schedule does.
    "DDIM": (DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}, True),
    "Euler": (EulerDiscreteScheduler, {}, False),
    "Euler a": (EulerAncestralDiscreteScheduler, {}, False),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, True),
}
PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 6, 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ours = StableDiffusion.from_family(TINY).eval()
    f = TINY
    unet = UNet2DConditionModel(**keymap_unet.diffusers_config(f.unet))
    unet.load_state_dict(keymap_unet.ours_to_diffusers(ours.unet.state_dict(), f.unet), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(f.vae), scaling_factor=f.latent_scale)
    vae.load_state_dict(keymap_vae.ours_to_diffusers(ours.vae.state_dict(), f.vae), strict=True)
    text = CLIPTextModel(transformers_text_config(f.text_encoder))
    text_sd = {k.removeprefix("text_model."): v for k, v in ours.text_encoder.state_dict().items()}
    text.load_state_dict(text_sd, strict=False)  # transformers 5 keeps a position_ids buffer of its own
    folder = write_hf_clip_vocab(tmp_path_factory.mktemp("vocab"))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="<|endoftext|>")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return ours, pipe


@pytest.mark.parametrize("sampler", list(CASES))
def test_txt2img_matches_diffusers(pair, sampler):
    ours, pipe = pair
    scheduler_cls, options, variance_preserving = CASES[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    alphas = scheduler.alphas_cumprod.double()
    if sampler == "DDIM":  # sigmas of DDIM's timesteps, then its final step to alpha = 1
        sigmas = ((1 - alphas[scheduler.timesteps]) / alphas[scheduler.timesteps]).sqrt()
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    else:
        sigmas = scheduler.sigmas.double()
    params = GenerationParams(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampler=sampler,
        steps=STEPS,
        cfg_scale=7.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        batch_size=2,
    )
    results = generate(ours, params, sigmas=sigmas, progress=False)

    seeds = [SEED, SEED + 1]
    side = SIZE // TINY.vae.downsampling_factor
    shape = (TINY.vae.embed_dim, side, side)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    noise = initial_noise(generators, shape)  # advances the generators past the initial draw
    sigma_max = sigmas[0].float()
    start = get_sampler(sampler).initial_latent(noise, sigma_max)  # what our pipeline starts from
    start = start / (sigma_max**2 + 1).sqrt() if variance_preserving else start / scheduler.init_noise_sigma
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
