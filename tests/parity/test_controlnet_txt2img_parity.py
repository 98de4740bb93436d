"""txt2img with ControlNet units against diffusers' StableDiffusionControlNetPipeline (one unit) and its
MultiControlNetModel (two units): same tiny random weights, same seeds and noise as test_txt2img_parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image
from test_controlnet_parity import random_controlnet

from latentforge.checkpoints import keymap_controlnet
from latentforge.checkpoints.controlnet import ControlNet
from latentforge.models.controlnet import ControlNetConfig
from latentforge.models.families import TINY
from latentforge.pipelines.controlnet import ControlNetUnit
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

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 5, 32
CASES = scheduler_cases()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vocab = write_hf_clip_vocab(tmp_path_factory.mktemp("vocab"))
    ours, pipe = build_pair(TINY, StableDiffusionPipeline, vocab)
    config = ControlNetConfig.for_base(TINY.unet, TINY.vae.downsampling_factor)
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = random_controlnet(config)
        for p in model.parameters():  # smaller residuals keep the tiny U-Net in range, still a large effect
            p.data.mul_(0.5)
        theirs = ControlNetModel(**keymap_controlnet.diffusers_config(config)).eval()
        theirs.load_state_dict(keymap_controlnet.ours_to_diffusers(model.state_dict(), config), strict=True)
        nets.append((ControlNet(model, f"cn{seed}", "abcd1234"), theirs))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
    return ours, pipe, nets, images


def _diffusers_latents(pipe, sampler, sigmas, scheduler, controlnet, image, scale):
    generators, start = diffusers_start(TINY, sampler, sigmas, scheduler, (SEED, SEED + 1), SIZE)
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control_pipe.set_progress_bar_config(disable=True)
    return control_pipe(
        PROMPT,
        image=image,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=2,
        generator=generators,
        latents=start,
        controlnet_conditioning_scale=scale,
        output_type="latent",
    ).images


def _ours(ours, sampler, sigmas, units):
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
        controlnet=tuple(units),
    )
    results = run(ours, request, progress=False)
    return torch.stack([r.latents for r in results]), results


def _schedule(pipe, sampler):
    scheduler_cls, options, _ = CASES[sampler]
    pipe.scheduler = scheduler_cls(**SD15_SCHEDULER, **options)
    pipe.scheduler.set_timesteps(STEPS)
    return pipe.scheduler, scheduler_sigmas(sampler, pipe.scheduler)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_one_unit_matches_diffusers(setup, sampler):
    ours, pipe, nets, images = setup
    scheduler, sigmas = _schedule(pipe, sampler)
    unit = ControlNetUnit(image=images[0], network=nets[0][0], weight=0.8, resize_mode="Just Resize")
    latents, results = _ours(ours, sampler, sigmas, [unit])
    plain, _ = _ours(ours, sampler, sigmas, [])
    reference = _diffusers_latents(pipe, sampler, sigmas, scheduler, nets[0][1], images[0], 0.8)
    assert (latents - plain).abs().max() > 0.05 * plain.abs().max()  # the ControlNet changes the image
    assert_close(latents, reference, tolerance=1e-4)
    assert 'ControlNet 0: "Module: none, Model: cn1 [abcd1234], Weight: 0.8, Resize Mode: Just Resize' in (
        results[0].infotext
    )


def test_two_units_match_multicontrolnet(setup):
    ours, pipe, nets, images = setup
    scheduler, sigmas = _schedule(pipe, "Euler")
    units = [
        ControlNetUnit(image=images[0], network=nets[0][0], weight=0.7, resize_mode="Just Resize"),
        ControlNetUnit(image=images[1], network=nets[1][0], weight=1.2, resize_mode="Just Resize"),
    ]
    latents, _ = _ours(ours, "Euler", sigmas, units)
    reference = _diffusers_latents(
        pipe, "Euler", sigmas, scheduler, [nets[0][1], nets[1][1]], images, [0.7, 1.2]
    )
    assert_close(latents, reference, tolerance=1e-4)


def test_weight_zero_equals_no_controlnet(setup):
    ours, pipe, nets, images = setup
    _, sigmas = _schedule(pipe, "Euler")
    unit = ControlNetUnit(image=images[0], network=nets[0][0], weight=0.0)
    with_unit, _ = _ours(ours, "Euler", sigmas, [unit])
    without, _ = _ours(ours, "Euler", sigmas, [])
    assert torch.equal(with_unit, without)


def test_guidance_window_end_to_end(setup):
    """start 1.0: no step k/n reaches it (k < n), so nothing changes; end 0: step 0 only, which does."""
    ours, pipe, nets, images = setup
    _, sigmas = _schedule(pipe, "Euler")
    without, _ = _ours(ours, "Euler", sigmas, [])
    never = ControlNetUnit(image=images[0], network=nets[0][0], guidance_start=1.0, guidance_end=1.0)
    first = ControlNetUnit(image=images[0], network=nets[0][0], guidance_start=0.0, guidance_end=0.0)
    assert torch.equal(_ours(ours, "Euler", sigmas, [never])[0], without)
    assert not torch.equal(_ours(ours, "Euler", sigmas, [first])[0], without)


def test_img2img_with_a_unit_matches_diffusers(setup):
    """As test_img2img_parity: diffusers at strength 0.6 and ours at 0.5 run the last 6 of 10 sigmas."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from latentforge.pipelines.request import InitImage

    ours, pipe, nets, images = setup
    _schedule(pipe, "Euler")
    pipe.scheduler.set_timesteps(10)
    sigmas = scheduler_sigmas("Euler", pipe.scheduler)
    init_image = images[1]
    unit = ControlNetUnit(image=images[0], network=nets[0][0], weight=0.9, resize_mode="Just Resize")
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=10, cfg_scale=7.0, seed=SEED,
        width=SIZE, height=SIZE, batch_size=2, init=InitImage((init_image,), 0.5),
        sigmas=tuple(sigmas.tolist()), controlnet=(unit,),
    )  # fmt: skip
    latents = torch.stack([r.latents for r in run(ours, request, progress=False)])
    control_pipe = StableDiffusionControlNetImg2ImgPipeline(**pipe.components, controlnet=nets[0][1])
    control_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        init = pipe.vae.encode(pipe.image_processor.preprocess(init_image)).latent_dist.mode()
    reference = control_pipe(
        [PROMPT] * 2, image=(init * pipe.vae.config.scaling_factor).expand(2, -1, -1, -1),
        control_image=images[0], strength=0.6, negative_prompt=[NEGATIVE] * 2, num_inference_steps=10,
        guidance_scale=7.0, controlnet_conditioning_scale=0.9, height=SIZE, width=SIZE,
        generator=[torch.Generator().manual_seed(s) for s in (SEED, SEED + 1)], output_type="latent",
    ).images  # fmt: skip
    assert_close(latents, reference, tolerance=1e-4)
