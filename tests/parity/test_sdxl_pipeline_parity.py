"""End-to-end SDXL against diffusers on tiny random weights, fp32, same noise: txt2img vs
StableDiffusionXLPipeline, and base + refiner vs the base with `denoising_end` then
StableDiffusionXLImg2ImgPipeline with `denoising_start` (A1111's refiner switch continues one Euler
sampler on the refiner; Euler keeps no history, so diffusers' two runs are the same computation).
The folder diffusers saves loads into ours (text_encoder_2/, tokenizer_2/) with the same tensors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import latentforge
from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY_XL, TINY_XL_REFINER
from latentforge.pipelines.request import GenerationRequest, Refiner, SizeConditioning
from latentforge.pipelines.runner import run
from latentforge.sampling.noise import initial_noise
from references import (
    SD15_SCHEDULER,
    assert_close,
    diffusers_vae_config,
    transformers_text_config,
    write_hf_clip_vocab,
)

PROMPT, NEGATIVE, SEED, STEPS, SIZE = "a red apple on a table", "blurry", 1234, 10, 64
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json: Euler, "leading", offset 1
SCHEDULER = {**SD15_SCHEDULER, "timestep_spacing": "leading"}


def _text(ours, cls):
    model = cls(transformers_text_config(ours.config)).eval()
    keys = model.state_dict().keys()
    sd = {k if k in keys else k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


def _components(ours: StableDiffusion, vocab):
    unet = UNet2DConditionModel(**keymap_unet.diffusers_config(ours.family.unet), sample_size=SIZE // 2)
    unet.load_state_dict(keymap_unet.ours_to_diffusers(ours.unet.state_dict(), ours.family.unet), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(ours.family.vae), scaling_factor=ours.family.latent_scale)
    vae.load_state_dict(keymap_vae.ours_to_diffusers(ours.vae.state_dict(), ours.family.vae), strict=True)
    tok = CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77, pad_token="<|endoftext|>")
    tok_2 = CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77, pad_token="!")
    parts = {"unet": unet.eval(), "vae": vae.eval(), "scheduler": EulerDiscreteScheduler(**SCHEDULER)}
    if ours.text_encoder_2 is None:  # the refiner: bigG alone, as text_encoder_2
        parts |= {"text_encoder": None, "tokenizer": None, "tokenizer_2": tok_2}
        parts["text_encoder_2"] = _text(ours.text_encoder, CLIPTextModelWithProjection)
    else:
        parts |= {
            "text_encoder": _text(ours.text_encoder, CLIPTextModel),
            "tokenizer": tok,
            "tokenizer_2": tok_2,
        }
        parts["text_encoder_2"] = _text(ours.text_encoder_2, CLIPTextModelWithProjection)
    return parts


def _randomize(model: StableDiffusion) -> StableDiffusion:
    # the label_emb and vector paths start small: larger weights make the size numbers matter
    with torch.no_grad():
        for p in model.unet.label_emb.parameters():
            p.mul_(20)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    base = _randomize(StableDiffusion.from_family(TINY_XL).eval())
    refiner = _randomize(StableDiffusion.from_family(TINY_XL_REFINER).eval())
    vocab = write_hf_clip_vocab(tmp_path_factory.mktemp("vocab"))
    pipe = StableDiffusionXLPipeline(**_components(base, vocab))
    refine = StableDiffusionXLImg2ImgPipeline(**_components(refiner, vocab), requires_aesthetics_score=True)
    for p in (pipe, refine):
        p.set_progress_bar_config(disable=True)
    return base, refiner, pipe, refine


def _start(sigmas, seeds, shape):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    noise = initial_noise(generators, shape)  # advances the generators past the initial draw
    return generators, noise * sigmas[0] / (sigmas[0] ** 2 + 1).sqrt()  # diffusers multiplies by init sigma


@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "empty-negative-zeros"])
def test_txt2img_matches_diffusers(models, negative):
    base, _, pipe, _ = models
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=negative, sampler="Euler", steps=STEPS, seed=SEED,
        width=SIZE, height=SIZE - 16, batch_size=2, sigmas=tuple(sigmas.tolist()),
    )  # fmt: skip
    results = run(base, request, progress=False)
    generators, start = _start(sigmas.float(), [SEED, SEED + 1], (4, (SIZE - 16) // 2, SIZE // 2))
    latents = pipe(
        PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS, guidance_scale=7.0,
        height=SIZE - 16, width=SIZE, num_images_per_prompt=2, generator=generators, latents=start,
        output_type="latent",
    ).images  # fmt: skip
    assert_close(torch.stack([r.latents for r in results]), latents, tolerance=1e-4)


def test_size_conditioning_matches_diffusers(models):
    # diffusers uses the negative sizes only when negative_target_size is given too; ours defaults the
    # negative target to the positive one, which the call below spells out
    base, _, pipe, _ = models
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    size_cond = SizeConditioning(
        original_size=(512, 384), crop_top_left=(8, 24), target_size=(1024, 1024),
        negative_original_size=(256, 256), negative_crop_top_left=(0, 0),
    )  # fmt: skip
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=STEPS, seed=SEED, width=SIZE,
        height=SIZE, sigmas=tuple(sigmas.tolist()), size_cond=size_cond,
    )  # fmt: skip
    ours = run(base, request, progress=False)[0].latents
    generators, start = _start(sigmas.float(), [SEED], (4, SIZE // 2, SIZE // 2))
    latents = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE,
        width=SIZE, generator=generators, latents=start, output_type="latent", original_size=(384, 512),
        crops_coords_top_left=(8, 24), target_size=(1024, 1024), negative_original_size=(256, 256),
        negative_crops_coords_top_left=(0, 0), negative_target_size=(1024, 1024),
    ).images[0]  # fmt: skip
    assert_close(ours, latents, tolerance=1e-4)
    default = run(base, GenerationRequest(**{**request.__dict__, "size_cond": None}), progress=False)[
        0
    ].latents
    assert (default - ours).abs().max() > 1e-2 * ours.abs().max()  # the numbers reach the U-Net


def test_base_plus_refiner_matches_diffusers_denoising_end_start(models):
    base, refiner, pipe, refine = models
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler="Euler", steps=STEPS, seed=SEED, width=SIZE,
        height=SIZE, sigmas=tuple(sigmas.tolist()), refiner=Refiner(switch_at=0.8),
    )  # fmt: skip
    result = run(base, request, progress=False, refiner=refiner)[0]
    generators, start = _start(sigmas.float(), [SEED], (4, SIZE // 2, SIZE // 2))
    common = {
        "num_inference_steps": STEPS,
        "guidance_scale": 7.0,
        "generator": generators,
        "output_type": "latent",
    }
    handed = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, latents=start, denoising_end=0.8, **common
    ).images  # fmt: skip
    latents = refine(PROMPT, negative_prompt=NEGATIVE, image=handed, denoising_start=0.8, **common).images[0]
    assert_close(result.latents, latents, tolerance=1e-4)
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.8" in result.infotext
    base_only = run(base, GenerationRequest(**{**request.__dict__, "refiner": None}), progress=False)[0]
    assert (base_only.latents - result.latents).abs().max() > 1e-3


def test_refiner_as_base_says_so(models):
    _, refiner, _, _ = models
    with pytest.raises(latentforge.errors.ParameterError, match="is an SDXL refiner: it only refines"):
        run(refiner, GenerationRequest(prompt="x", steps=2, width=SIZE, height=SIZE), progress=False)


def test_diffusers_folder_loads(models, tmp_path):
    base, refiner, pipe, refine = models
    for ours, reference, name in ((base, pipe, "base"), (refiner, refine, "refiner")):
        reference.save_pretrained(tmp_path / name)
        loaded = latentforge.load(tmp_path / name, compute_hash=False)
        assert loaded.family == ours.family
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            a, b = getattr(ours, component), getattr(loaded, component)
            assert (a is None) == (b is None)
            if a is not None:
                sd = b.state_dict()
                assert all(torch.equal(v, sd[k]) for k, v in a.state_dict().items()), (name, component)


def test_our_diffusers_folder_loads_in_diffusers_and_back(models, tmp_path):
    from latentforge.checkpoints.diffusers_folder import save_diffusers_folder

    base, refiner, pipe, refine = models
    for ours, cls, name in (
        (base, StableDiffusionXLPipeline, "base"),
        (refiner, StableDiffusionXLImg2ImgPipeline, "refiner"),
    ):
        g = None if ours.text_encoder_2 is None else ours.text_encoder_2.state_dict()
        sds = (ours.unet.state_dict(), ours.vae.state_dict(), ours.text_encoder.state_dict())
        folder = save_diffusers_folder(tmp_path / name, *sds, ours.family, text_encoder_2=g)
        theirs = cls.from_pretrained(folder, local_files_only=True)  # strict: diffusers warns otherwise
        reference = pipe if name == "base" else refine
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            a, b = getattr(reference, component), getattr(theirs, component)
            assert (a is None) == (b is None), (name, component)
            if a is not None:
                sd = b.state_dict()
                assert all(torch.equal(v, sd[k]) for k, v in a.state_dict().items()), (name, component)
        assert latentforge.load(folder, compute_hash=False).family == ours.family
