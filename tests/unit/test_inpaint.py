"""Inpainting and outpainting on the tiny model: A1111's blending formula, masks, fill, paste-back, crops."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from latentforge.data.images import ImageLoadError
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.generate import make_denoiser
from latentforge.pipelines.images import encode_images, pil_to_tensor
from latentforge.pipelines.inpaint import (
    blur_mask,
    crop_region,
    expand_to_ratio,
    extend_canvas,
    fill_masked,
    gaussian_blur,
    inpaint_concat,
    latent_mask,
    load_mask,
    mask_to_l,
)
from latentforge.pipelines.prompt_guidance import PromptConditioner
from latentforge.pipelines.request import MASKED_CONTENT, GenerationRequest, InitImage, Inpaint
from latentforge.pipelines.runner import run
from latentforge.pipelines.seeds import request_noise
from latentforge.sampling.registry import sampling_sigmas

SIZE = 32
PARAMS = GenerationRequest(
    prompt="a cat", negative_prompt="dog", steps=4, sampler="Euler", seed=7, cfg_scale=5
)
STRENGTH = 0.75


def inpaint(model, request, image, mask, **options):  # noqa: ANN001, ANN201
    """The inpainting request of `image` and `mask` (options are `Inpaint` fields), run."""
    init = InitImage((image,), STRENGTH)
    return run(model, replace(request, init=init, inpaint=Inpaint(mask=mask, **options)))


def outpaint(model, request, image, left=0, right=0, top=0, bottom=0, **options):  # noqa: ANN001, ANN201
    part = Inpaint(outpaint=(left, right, top, bottom), **options)
    return run(model, replace(request, init=InitImage((image,), STRENGTH), inpaint=part))


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def make_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)


def make_mask(box: tuple[int, int, int, int] = (8, 6, 22, 20), size: int = SIZE) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def test_blur_is_a1111s_gaussian():
    """cv2.GaussianBlur (ksize 2*int(2.5 s + 0.5) + 1, sigma s, BORDER_REFLECT_101) = scipy 'mirror'."""
    rng = np.random.default_rng(1)
    array = (rng.random((20, 30)) * 255).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(array)[None, None], 2.3)[0, 0].numpy()
    reference = gaussian_filter(array.astype(np.float64), 2.3, mode="mirror", truncate=2.5)
    assert np.abs(ours - reference).max() < 1e-3
    assert blur_mask(make_mask(), 0).tobytes() == make_mask().tobytes()


def test_crop_region_and_aspect_expansion():
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[200:232, 200:328] = 255  # 128 x 32, A1111's docstring example
    region = crop_region(mask, 0)
    assert region == (200, 200, 328, 232)
    assert expand_to_ratio(region, 512, 512, 512, 512) == (200, 152, 328, 280)  # grown to 128 x 128
    assert crop_region(mask, 300) == (0, 0, 512, 512)
    mask[:] = 0
    mask[490:512, 10:138] = 255  # at the bottom edge: the grown box is shifted back inside
    x1, y1, x2, y2 = expand_to_ratio(crop_region(mask, 0), 512, 512, 512, 512)
    assert (x2 - x1, y2 - y1) == (128, 128) and y2 == 512
    assert crop_region(np.zeros((8, 8)), 4) is None


def blend_reference(model, params, image, mask):  # noqa: ANN001, ANN201
    """A1111's inpainting for ordinary models written out: Euler steps, x0 blended after each call."""
    pixels = pil_to_tensor([image])
    init = encode_images(model, pixels)
    nmask = latent_mask(mask, (SIZE // 2, SIZE // 2))  # 1 = repaint
    denoiser = make_denoiser(model)
    full = sampling_sigmas("Euler", "Automatic", params.steps, denoiser.sigmas).float()
    sigmas = full[-(int(STRENGTH * params.steps) + 1) - 1 :]
    noise = request_noise([params.seed], (4, SIZE // 2, SIZE // 2))
    guided = PromptConditioner(model, 1, params.steps).denoiser(
        denoiser, [params.prompt], [params.negative_prompt], sigmas, params.cfg_scale
    )
    x = init + noise * sigmas[0]
    with torch.inference_mode():
        for i in range(len(sigmas) - 1):
            denoised = guided(x, sigmas[i]) * nmask + init * (1 - nmask)  # CFGDenoiser's apply_blend
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x * nmask + init * (1 - nmask), init, nmask  # processing.py: samples * nmask + init * mask


def test_blending_matches_a1111_formula(model):
    params = replace(PARAMS, width=SIZE, height=SIZE)
    image, mask = make_image(), make_mask()
    expected, _, _ = blend_reference(model, params, image, mask)
    result = inpaint(model, params, image, mask, mask_blur=0)
    assert torch.allclose(result[0].latents, expected[0], atol=1e-5), (
        (result[0].latents - expected[0]).abs().max()
    )


@pytest.mark.parametrize("content", MASKED_CONTENT)
def test_unmasked_latents_are_the_init_latents_exactly(model, content):
    image, mask = make_image(2), make_mask()
    blurred = blur_mask(mask, 2)
    keep = 1 - latent_mask(blurred, (SIZE // 2, SIZE // 2))
    start = image if content == "original" else fill_masked(image, blurred)  # A1111 fills unless "original"
    init = encode_images(model, pil_to_tensor([start]))
    results = inpaint(model, replace(PARAMS, batch_size=2), image, mask, mask_blur=2, masked_content=content)
    for r in results:
        assert torch.equal(r.latents * keep[0], init[0] * keep[0])
        assert not torch.equal(r.latents * (1 - keep[0]), init[0] * (1 - keep[0]))


def test_pixels_outside_the_blurred_mask_are_the_original(model):
    image, mask = make_image(3), make_mask()
    result = inpaint(model, PARAMS, image, mask, mask_blur=2)[0].image
    outside = np.asarray(blur_mask(mask, 2)) == 0
    assert np.array_equal(np.asarray(result)[outside], np.asarray(image)[outside])
    assert not np.array_equal(np.asarray(result)[~outside], np.asarray(image)[~outside])


def test_only_masked_crops_and_pastes_back(model):
    image, mask = make_image(4, 48), make_mask((30, 30, 40, 38), 48)
    params = replace(PARAMS, width=SIZE, height=SIZE)
    result = inpaint(model, params, image, mask, mask_blur=1, only_masked=True, only_masked_padding=4)
    assert result[0].image.size == (48, 48)
    assert (
        "Inpaint area: Only masked" in result[0].infotext and "Masked area padding: 4" in result[0].infotext
    )
    outside = np.asarray(blur_mask(mask, 1)) == 0
    assert np.array_equal(np.asarray(result[0].image)[outside], np.asarray(image)[outside])
    with pytest.raises(ParameterError, match="empty"):
        inpaint(model, params, image, Image.new("L", (48, 48)), only_masked=True)


def test_mask_of_another_size_is_resized_with_a_warning(model):
    with pytest.warns(UserWarning, match="resized"):
        result = inpaint(model, PARAMS, make_image(), make_mask((4, 4, 12, 12), 16))
    assert result[0].image.size == (SIZE, SIZE)


def test_rgba_mask_uses_alpha_and_files_are_checked(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 8))
    assert np.array_equal(np.asarray(mask_to_l(rgba))[0], [255] * 4 + [0] * 4)
    assert mask_to_l(Image.new("RGB", (2, 2), (255, 255, 255))).getpixel((0, 0)) == 255
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageLoadError, match="bad.png"):
        load_mask(tmp_path / "bad.png")


def test_fill_pulls_colours_from_the_unmasked_area():
    array = np.zeros((16, 32, 3), dtype=np.uint8)
    array[:, :16] = (255, 0, 0)
    array[:, 16:] = (0, 0, 255)
    mask = make_mask((10, 0, 22, 16), 32).crop((0, 0, 32, 16))
    filled = np.asarray(fill_masked(Image.fromarray(array), mask)).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(filled[keep], array[keep])
    assert filled[8, 10, 0] > filled[8, 10, 2] and filled[8, 21, 2] > filled[8, 21, 0]


def test_inpaint_concat_is_mask_then_masked_image_latents(model):
    pixels = pil_to_tensor([make_image()])
    mask = make_mask()
    concat = inpaint_concat(model, pixels, mask)
    binary = torch.from_numpy(np.asarray(mask) / 255.0).float()
    assert torch.equal(concat[0, 0], binary[::2, ::2])  # nearest resize to the latent size
    assert torch.equal(concat[:, 1:], encode_images(model, pixels * (1 - binary))) or torch.allclose(
        concat[:, 1:], encode_images(model, pixels * (1 - binary)), atol=1e-6
    )


def test_outpaint_extends_with_edge_pixels_and_keeps_the_original(model):
    image = make_image(5)
    canvas, mask = extend_canvas(image, 8, 0, 0, 4, overlap=2)
    assert canvas.size == (40, 36)
    assert np.array_equal(np.asarray(canvas)[:32, 8:], np.asarray(image))
    assert np.array_equal(np.asarray(canvas)[:32, 0], np.asarray(image)[:, 0])  # edge pixels repeated
    m = np.asarray(mask)
    assert m[:, :10].min() == 255 and m[:30, 10:].max() == 0 and m[30:].min() == 255
    result = outpaint(model, replace(PARAMS, width=0, height=0), image, left=8, bottom=4, mask_blur=2)
    out = np.asarray(result[0].image)
    assert out.shape == (36, 40, 3)
    outside = np.asarray(blur_mask(mask, 2)) == 0
    assert outside.sum() > 400 and np.array_equal(out[outside], np.asarray(canvas)[outside])
    assert "Outpaint: 8,0,0,4" in result[0].infotext or 'Outpaint: "8,0,0,4"' in result[0].infotext


def test_outpaint_canvas_must_fit_the_vae(model):
    with pytest.raises(ParameterError, match="nearest valid"):
        outpaint(model, replace(PARAMS, width=0, height=0), make_image(), left=3)
    with pytest.raises(ParameterError, match="outpaint margin must be a whole number in \\[0, 4096\\]"):
        outpaint(model, PARAMS, make_image(), left=100_000)  # refused before any canvas is built
    with pytest.raises(ParameterError, match="mask blur must be a finite number in \\[0, 256\\]"):
        outpaint(model, PARAMS, make_image(), left=8, mask_blur=1e9)
    with pytest.raises(ParameterError, match="positive margin"):
        outpaint(model, PARAMS, make_image())
