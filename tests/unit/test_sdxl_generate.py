"""SDXL through the one runner on tiny random models: img2img, inpainting (4- and 9-channel U-Nets), the
hires fix, the refiner after img2img; A1111's prompt weighting and chunking on both text encoders, checked
against transformers' encoders run chunk by chunk."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection

from latentforge.model import StableDiffusion
from latentforge.models.families import TINY_XL, TINY_XL_REFINER
from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, Inpaint, Refiner
from latentforge.pipelines.runner import run
from latentforge.pipelines.sdxl_conditioning import sdxl_schedules
from latentforge.prompts.conditioning import tokenize_weighted
from references import assert_close, transformers_text_config

SIZE = 64
BASE = GenerationRequest(prompt="a cat", negative_prompt="dog", steps=3, sampler="Euler", seed=7)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {f.name: StableDiffusion.from_family(f).eval() for f in (TINY_XL, TINY_XL_REFINER)}


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((SIZE, SIZE))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def test_img2img_inpaint_hires_and_refiner_run(models):
    base, refiner = models["tiny-sdxl"], models["tiny-sdxl-refiner"]
    init = InitImage(images=(_image(),), denoising_strength=0.6)
    cases = {
        "img2img": replace(BASE, init=init),
        "inpaint": replace(BASE, init=init, inpaint=Inpaint(mask=_mask())),
        "hires": replace(BASE, width=SIZE, height=SIZE, hires=Hires(scale=1.5, steps=2)),
    }
    for name, request in cases.items():
        (result,) = run(base, request, progress=False)
        assert torch.isfinite(result.latents).all(), name
    (hires,) = run(base, cases["hires"], progress=False)
    assert hires.image.size == (96, 96)
    # the refiner alone refines an image; after a base img2img it takes over at the switch
    assert run(refiner, cases["img2img"], progress=False)[0].image.size == (SIZE, SIZE)
    refined = run(
        base, replace(cases["img2img"], refiner=Refiner(switch_at=0.5)), progress=False, refiner=refiner
    )
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in refined[0].infotext


def test_refiner_with_hires_refines_the_second_pass_only(models):
    """A1111's default (`hires_fix_refiner_pass = "second pass"`): the first pass is the base model's alone;
    the hires pass switches to the refiner by the timestep rule, conditioned at the hires size."""
    base, refiner = models["tiny-sdxl"], models["tiny-sdxl-refiner"]
    hires = Hires(scale=1.5, steps=4, denoising_strength=0.7)
    request = replace(BASE, width=SIZE, height=SIZE, steps=4, hires=hires, refiner=Refiner(switch_at=0.6))
    seen: dict[str, list[int]] = {"base": [], "refiner": []}
    hooks = [
        m.unet.register_forward_hook(lambda _m, args, _o, key=key: seen[key].append(args[0].shape[-1]))
        for key, m in (("base", base), ("refiner", refiner))
    ]
    try:
        (refined,) = run(base, request, progress=False, refiner=refiner)
    finally:
        for hook in hooks:
            hook.remove()
    f = TINY_XL.vae.downsampling_factor
    small, large = SIZE // f, int(SIZE * 1.5) // f
    assert set(seen["refiner"]) == {large}  # never in the first pass
    assert small in seen["base"] and large in seen["base"]  # the hires pass began on the base
    (plain,) = run(base, replace(request, refiner=None), progress=False)
    assert (refined.latents - plain.latents).abs().max() > 1e-3
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.6" in refined.infotext
    assert "Hires refiner" not in refined.infotext  # A1111 writes it only for "first pass"/"both passes"


def test_nine_channel_inpainting_unet(models):
    family = replace(TINY_XL, name="tiny-sdxl-inpaint", unet=replace(TINY_XL.unet, in_channels=9))
    torch.manual_seed(0)
    model = StableDiffusion.from_family(family).eval()
    request = replace(BASE, init=InitImage(images=(_image(),)), inpaint=Inpaint(mask=_mask()))
    assert torch.isfinite(run(model, request, progress=False)[0].latents).all()
    assert torch.isfinite(run(model, replace(BASE, width=SIZE, height=SIZE), progress=False)[0].latents).all()


def _reference_side(ours, cls, tokenizer, prompt):
    """A1111's weighting by hand on transformers' encoder: hidden_states[-2] per chunk, weights, mean kept."""
    reference = cls(transformers_text_config(ours.config)).eval()
    keys = reference.state_dict().keys()
    reference.load_state_dict(
        {k if k in keys else k.removeprefix("text_model."): v for k, v in ours.state_dict().items()},
        strict=False,
    )
    zs, pooled = [], None
    for chunk in tokenize_weighted(tokenizer, prompt):
        out = reference(torch.tensor([chunk.tokens]), output_hidden_states=True)
        z = out.hidden_states[-2][0]
        weights = torch.tensor(chunk.weights)[:, None]
        zs.append(z * weights * (z.mean() / (z * weights).mean()))
        if pooled is None and cls is CLIPTextModelWithProjection:
            pooled = out.text_embeds[0]  # A1111: the first chunk's pooled output, unweighted
    return torch.cat(zs), pooled


def test_prompt_weighting_on_both_encoders_matches_a1111_by_hand(models):
    base = models["tiny-sdxl"]
    prompt = "a (red:1.4) apple, " * 20 + "BREAK [on a table], studio light"  # three chunks
    ((_, crossattn, pooled),) = sdxl_schedules(base, [prompt], 10, clip_skip=2)[0:1][0]
    with torch.no_grad():
        z_l, _ = _reference_side(base.text_encoder, HFCLIPTextModel, base.tokenizer, prompt)
        z_g, pooled_g = _reference_side(
            base.text_encoder_2, CLIPTextModelWithProjection, base.tokenizer_2, prompt
        )
    assert len(tokenize_weighted(base.tokenizer, prompt)) == 3
    assert crossattn.shape == (77 * 3, TINY_XL.unet.context_dim)
    assert_close(crossattn, torch.cat([z_l, z_g], dim=-1))
    assert_close(pooled, pooled_g)


def _save(model, path):
    from latentforge.checkpoints.single_file import save_single_file

    g = None if model.text_encoder_2 is None else model.text_encoder_2.state_dict()
    sds = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    save_single_file(path, *sds, model.family, text_encoder_2=g)
    return str(path)


def test_cli_refiner_and_size_flags(models, tmp_path, capsys):
    from latentforge.cli import main
    from latentforge.pipelines.infotext import read_infotext

    base = _save(models["tiny-sdxl"], tmp_path / "base.safetensors")
    refiner = _save(models["tiny-sdxl-refiner"], tmp_path / "refiner.safetensors")
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--model", base, "--steps", "3", "--seed", "1", "--out", str(out)]
    flags = [
        "--refiner",
        refiner,
        "--refiner-switch-at",
        "0.6",
        "--original-size",
        "512x384",
        "--crop-top-left",
        "0,8",
    ]
    assert main([*argv, *flags]) == 0
    (png,) = out.glob("*.png")
    info = read_infotext(Image.open(png))
    assert "Refiner switch at: 0.6" in info and "SDXL original size: 512x384" in info
    assert 'SDXL crop top left: "0,8"' in info  # quoted: the value holds a comma (A1111)
    # a refiner as the model says so, as one error line
    assert main(["generate", "a cat", "--model", refiner, "--steps", "2", "--out", str(out)]) == 2
    assert "is an SDXL refiner: it only refines" in capsys.readouterr().err


def test_fp16_vae_swap_and_the_fp32_retry(models, tmp_path):
    """A diffusers-layout VAE file (as madebyollin's sdxl-vae-fp16-fix ships) swaps in; one that overflows in
    fp16 is decoded again in fp32 and the infotext records it (the existing NaN retry)."""
    import latentforge
    from latentforge.checkpoints import keymap_vae
    from latentforge.checkpoints.writing import save_safetensors

    model = models["tiny-sdxl"]
    vae = {k: v.clone() for k, v in model.vae.state_dict().items()}
    vae["decoder.conv_in.weight"] *= 3000  # weights fit fp16, its activations do not (65504); fp32 is fine
    path = tmp_path / "sdxl_vae.safetensors"
    save_safetensors(path, keymap_vae.ours_to_diffusers(vae, model.family.vae), {"format": "pt"})
    loaded = latentforge.load(_save(model, tmp_path / "m.safetensors"), dtype=torch.float16, vae=path)
    (result,) = run(loaded, replace(BASE, width=SIZE, height=SIZE, steps=2), progress=False)
    assert "VAE: sdxl_vae.safetensors" in result.infotext
    assert "VAE decoded in fp32: True" in result.infotext
    assert np.asarray(result.image).std() > 0
