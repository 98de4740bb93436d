"""Generation invariants on the tiny model: batch independence, variation seeds, infotext round trips,
parameter validation, and the CLI's handling of bad input, interrupts and previews."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.checkpoints.single_file import save_single_file
from latentforge.cli import main
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import SD1, TINY
from latentforge.pipelines.infotext import parse_infotext, read_infotext
from latentforge.pipelines.preview import latent_preview, latent_rgb_projection
from latentforge.pipelines.request import GenerationRequest, InitImage, resolve
from latentforge.pipelines.request_infotext import from_infotext
from latentforge.pipelines.runner import iter_images, run
from latentforge.pipelines.seeds import request_noise

PARAMS = GenerationRequest(
    prompt="a cat", negative_prompt="dog", steps=3, seed=100, width=32, height=32, cfg_scale=5
)


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M SDE"])
def test_image_i_of_a_batch_is_seed_plus_i_alone(model, sampler):
    params = replace(PARAMS, sampler=sampler)
    batch = run(model, replace(params, batch_size=3), progress=False)
    for i, result in enumerate(batch):
        alone = run(model, replace(params, seed=PARAMS.seed + i), progress=False)[0]
        assert result.seed == PARAMS.seed + i
        # Random tiny weights give |latents| ~ 50; measured max abs diff ~1.1e-4 (2.3e-6 relative, a few
        # float32 ulps from batched matmuls), so the bound is relative to the latents' scale.
        assert (result.latents - alone.latents).abs().max() <= 1e-5 * alone.latents.abs().max()


def test_variation_seed_strength_0_and_1(model):
    params = replace(PARAMS, sampler="Euler")
    plain = run(model, params, progress=False)[0]
    at_zero = run(model, replace(params, subseed=555, subseed_strength=0.0), progress=False)[0]
    at_one = run(model, replace(params, subseed=555, subseed_strength=1.0), progress=False)[0]
    subseed_alone = run(model, replace(params, seed=555), progress=False)[0]
    assert torch.equal(plain.latents, at_zero.latents)
    assert torch.allclose(at_one.latents, subseed_alone.latents, atol=1e-5)
    noise = request_noise([100], (4, 16, 16), subseeds=[555], subseed_strength=1.0)
    assert torch.allclose(noise, request_noise([555], (4, 16, 16)), atol=1e-6)
    # A1111: with a variation seed every image keeps the seed and the subseed counts up
    batch = run(model, replace(params, subseed=555, subseed_strength=0.3, batch_size=2), progress=False)
    assert [r.seed for r in batch] == [100, 100]
    assert [parse_infotext(r.infotext)[2]["Variation seed"] for r in batch] == ["555", "556"]


def test_infotext_round_trip_regenerates_bit_for_bit(model):
    params = replace(
        PARAMS,
        prompt="a cat, sitting: on a mat\nsecond line",
        negative_prompt="dog, blurry",
        sampler="Euler a",
        seed=-1,
        subseed=77,
        subseed_strength=0.25,
        cfg_rescale=0.5,
        clip_skip=2,
        eta=0.8,
    )
    first = run(model, params, progress=False)[0]
    parsed = from_infotext(first.infotext).request
    again = run(model, parsed, progress=False)[0]
    assert parsed.seed == first.seed and parsed.subseed == 77
    assert parsed == first.request
    assert torch.equal(first.latents, again.latents)
    assert again.infotext == first.infotext


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sampler": "Euler b"}, "valid names: DPM\\+\\+ 2M, .*Euler a"),
        ({"steps": 0}, "steps must be a whole number in \\[1, 1000\\]"),
        ({"steps": 1001}, "steps must be a whole number in \\[1, 1000\\]"),
        (
            {"init": InitImage(denoising_strength=1.5)},
            "denoising strength must be a finite number in \\[0, 1\\]",
        ),
        ({"cfg_scale": math.nan}, "must be a finite number"),
        ({"width": 100}, "width 100 is not a positive multiple of 8 .*nearest valid: (96|104)"),
        ({"height": 515}, "height 515 .*nearest valid: 512"),
        ({"batch_size": 0}, "batch size must be a whole number in \\[1, 64\\]"),
        ({"batch_size": 100000}, "batch size must be a whole number in \\[1, 64\\]"),
        ({"subseed_strength": -0.1}, "variation seed strength"),
        ({"schedule": "bogus"}, "unknown schedule 'bogus'; valid names: Automatic, Uniform"),
        ({"eta": 0.5}, "sampler 'DPM\\+\\+ 2M' takes no option 'eta'; samplers that take it: .*Euler a"),
    ],
)
def test_bad_parameters_are_rejected_with_the_fix(change, message):
    sd1 = replace(StableDiffusion.from_family(TINY, device="meta"), family=SD1)
    with pytest.raises(ParameterError, match=message):
        resolve(replace(GenerationRequest(width=512, height=512), **change), sd1)


def test_sizes_are_never_changed_silently(model):
    with pytest.raises(ParameterError, match="width 33 .*nearest valid: 3[24]"):
        run(model, replace(PARAMS, width=33), progress=False)
    with pytest.raises(ParameterError, match="1 or batch size"):
        three = InitImage((Image.new("RGB", (32, 32)),) * 3)
        run(model, replace(PARAMS, batch_size=2, init=three), progress=False)


def test_interrupt_keeps_finished_batches(model):
    kept = []
    calls = 0

    def interrupt_in_second_batch(info) -> None:  # noqa: ANN001
        nonlocal calls
        calls += 1
        if calls > PARAMS.steps:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for result in iter_images(model, replace(PARAMS, batch_count=3), callback=interrupt_in_second_batch):
            kept.append(result)
    assert len(kept) == 1 and kept[0].seed == PARAMS.seed


def test_preview_projection_is_published_for_sd_and_fitted_otherwise(model):
    sd_like = replace(model, family=SD1)
    assert torch.equal(latent_rgb_projection(sd_like)[0], torch.tensor([0.298, 0.207, 0.208]))
    fitted = latent_rgb_projection(model)
    assert fitted.shape == (5, 3) and torch.isfinite(fitted).all()
    image = latent_preview(torch.zeros(4, 16, 16), fitted)
    assert image.size == (16, 16)
    # a constant latent previews as one colour: the bias row, mapped to 8 bits
    expected = ((fitted[-1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).tolist()
    assert list(image.getpixel((3, 3))) == expected


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_single_file(
        path, model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), TINY
    )
    return path


def test_cli_bad_images_give_clear_errors(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    assert main(["generate", "x", "--model", "none", "--init-image", str(tmp_path / "broken.png")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["generate", "x", "--model", "none", "--mask", str(tmp_path / "broken.png")]) == 2
    assert "--init-image" in capsys.readouterr().err


def test_cli_inpaint_with_previews_and_rgba_init(checkpoint, tmp_path, capsys):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent: composited onto white
    rgba.save(tmp_path / "init.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "mask.png")  # another size: resized with a warning
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--model", str(checkpoint), "--init-image", str(tmp_path / "init.png")]
    argv += ["--mask", str(tmp_path / "mask.png"), "--steps", "3", "--sampler", "Euler", "--seed", "5"]
    argv += ["--strength", "0.5", "--masked-content", "fill", "--preview-every", "1", "--out", str(out)]
    with pytest.warns(UserWarning, match="resized"):
        assert main(argv) == 0
    written = sorted(out.glob("0*.png"))
    assert len(written) == 1 and (out / "preview.png").is_file()
    info = read_infotext(written[0])
    assert info is not None and "Masked content: fill" in info and "Mask blur: 4" in info
    assert np.asarray(Image.open(written[0])).shape == (32, 32, 3)
    hires_argv = ["generate", "a cat", "--model", str(checkpoint), "--size", "32x32", "--steps", "2"]
    hires_argv += ["--hires-scale", "2", "--hires-steps", "1", "--out", str(out)]
    assert main(hires_argv) == 0
    assert Image.open(sorted(out.glob("0*.png"))[-1]).size == (64, 64)


def test_batches_of_mixed_prompts_equal_each_image_alone(model):
    pairs = (("a cat", 7), ("a red dog", 3), ("a cat", 8))
    results = run(model, replace(PARAMS, sampler="Euler a", batch_size=2, prompt_seeds=pairs), progress=False)
    assert [r.seed for r in results] == [7, 3, 8]
    for (prompt, seed), result in zip(pairs, results, strict=True):
        single = replace(PARAMS, sampler="Euler a", prompt=prompt, seed=seed)
        alone = run(model, single, progress=False)[0]
        assert parse_infotext(result.infotext)[0] == prompt
        # same bound as the seed + i test above: batched matmuls differ by float32 ulps
        assert (result.latents - alone.latents).abs().max() <= 1e-5 * alone.latents.abs().max()
    assert not torch.allclose(results[0].latents, results[1].latents)
