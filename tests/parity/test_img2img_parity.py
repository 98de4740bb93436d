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

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY, ModelFamily
from latentforge.pipelines.generate import generate
from latentforge.pipelines.params import GenerationParams
from references import assert_close, diffusers_vae_config, transformers_text_config, write_hf_clip_vocab

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
CASES = {
    "DDIM": (DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 10, 32
DIFFUSERS_STRENGTH, OUR_STRENGTH = 0.6, 0.5  # both run 6 of 10 steps


def build_pair(family: ModelFamily, pipeline_cls: type, vocab: Path) -> tuple[StableDiffusion, object]:
    """Our random model of `family` and a diffusers pipeline holding the same weights."""
    torch.manual_seed(0)
    ours = StableDiffusion.from_family(family).eval()
    unet = UNet2DConditionModel(**keymap_unet.diffusers_config(family.unet), sample_size=64)
    unet.load_state_dict(keymap_unet.ours_to_diffusers(ours.unet.state_dict(), family.unet), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(family.vae), scaling_factor=family.latent_scale)
    vae.load_state_dict(keymap_vae.ours_to_diffusers(ours.vae.state_dict(), family.vae), strict=True)
    text = CLIPTextModel(transformers_text_config(family.text_encoder))
    text_sd = {k.removeprefix("text_model."): v for k, v in ours.text_encoder.state_dict().items()}
    text.load_state_dict(text_sd, strict=False)  # transformers 5 keeps a position_ids buffer of its own
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77, pad_token="<|endoftext|>")
    pipe = pipeline_cls(
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


def scheduler_sigmas(name: str, scheduler) -> torch.Tensor:  # noqa: ANN001
    """The full descending sigmas (trailing 0) a diffusers scheduler runs after `set_timesteps`."""
    if name == "DDIM":  # sigmas of DDIM's timesteps, then its final step to alpha = 1
        alphas = scheduler.alphas_cumprod.double()[scheduler.timesteps]
        return torch.cat([((1 - alphas) / alphas).sqrt(), torch.zeros(1, dtype=torch.float64)])
    return scheduler.sigmas.double()


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
    scheduler_cls, options = CASES[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = scheduler_sigmas(sampler, pipe.scheduler)
    image = make_image()
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
        denoising_strength=OUR_STRENGTH,
    )
    results = generate(ours, params, init_images=[image], sigmas=sigmas, progress=False)

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
