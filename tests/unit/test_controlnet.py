"""ControlNet units: preprocessors against OpenCV or hand-computed cases, hint sizing, the soft-weight and
guidance-window rules, the A1111 infotext both ways, bad inputs, and the command line end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentforge.checkpoints.controlnet import ControlNet, load_controlnet, save_controlnet
from latentforge.checkpoints.errors import UnknownArchitectureError
from latentforge.cli import main
from latentforge.errors import ParameterError
from latentforge.models.controlnet import ControlNetConfig, ControlNetModel
from latentforge.models.families import TINY
from latentforge.pipelines import preprocessors as pre
from latentforge.pipelines.controlnet import (
    ActiveUnit,
    ControlNetUnit,
    build_hint,
    control_residuals,
    fit_map,
    pixel_perfect_resolution,
)
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.request_infotext import from_infotext, to_infotext

DATA = Path(__file__).parents[1] / "data" / "a1111_infotexts"


def square(size: int = 64, lo: int = 0, hi: int = 255) -> np.ndarray:
    image = np.full((size, size, 3), lo, np.uint8)
    image[16:48, 16:48] = hi
    return image


def test_canny_is_opencv_canny_and_finds_the_square_outline():
    image = square()
    edges = pre.canny(image, 64)
    assert np.array_equal(edges[:, :, 0], cv2.Canny(image, 100, 200))
    on = np.argwhere(edges[:, :, 0] > 0)
    assert on[:, 0].min() in (15, 16) and on[:, 0].max() in (47, 48)  # the square's border rows
    assert edges[30, 30, 0] == 0 and edges[2, 2, 0] == 0  # flat inside and outside


def test_threshold_invert_and_lineart_by_hand():
    image = square(lo=100, hi=200)
    assert np.array_equal(pre.threshold(image, 64)[:, :, 0], np.where(image[:, :, 0] > 127, 255, 0))
    assert np.array_equal(pre.invert(image, 64), 255 - image)
    drawing = np.full((64, 64, 3), 255, np.uint8)
    drawing[:, 31:33] = 0  # a dark line on a light page
    lines = pre.lineart_standard(drawing, 64)[:, :, 0]
    # the line's pixels are the median of the strong ones, so (value / median) * 127 = 127; the page is 0
    assert (lines[:, 31:33] == 127).all() and lines[:, :20].max() == 0


def test_softedge_sobel_peaks_on_the_step_and_is_symmetric():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    edge = pre.softedge_sobel(image, 32)[:, :, 0].astype(int)
    row = edge[16]
    assert row.max() == 255 and set(np.flatnonzero(row == 255)) <= {15, 16}
    assert np.array_equal(row[:16], row[16:][::-1])  # a symmetric response around the step
    assert row[:8].max() == 0


def test_resize_short_side_blur_and_tile_match_opencv():
    image = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    assert pre.resize_short_side(image, 20).shape == (20, 40, 3)
    assert np.array_equal(pre.blur_gaussian(image, 40, sigma=2.0), cv2.GaussianBlur(image, (0, 0), 2.0))
    assert pre.tile_resample(image, 512, rate=2.0).shape == (20, 40, 3)
    assert pre.tile_resample(image, 512, rate=1.0) is image


def test_shuffle_is_seeded_and_only_moves_pixels():
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = pre.shuffle(image, 64, rng=np.random.default_rng(5))
    b = pre.shuffle(image, 64, rng=np.random.default_rng(5))
    c = pre.shuffle(image, 64, rng=np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= image.min() and a.max() <= image.max()


def test_model_based_modules_say_bring_your_own():
    with pytest.raises(ParameterError, match="annotated image.*module 'none'"):
        pre.get_preprocessor("depth_midas")
    with pytest.raises(ParameterError, match="valid: none, canny"):
        pre.get_preprocessor("cany")


def test_resize_modes_and_pixel_perfect():
    detected = np.zeros((100, 200, 3), np.uint8)
    detected[:, :100] = 255  # left half white
    assert fit_map(detected, 64, 64, "Just Resize").shape == (64, 64, 3)
    crop = fit_map(detected, 64, 64, "Crop and Resize")  # cover 128x64, keep the centre: half white
    assert crop.shape == (64, 64, 3) and crop[:, :30].min() == 255 and crop[:, 34:].max() == 0
    fill = fit_map(detected, 64, 64, "Resize and Fill")  # fit 64x32, pad top and bottom
    assert fill.shape == (64, 64, 3) and fill[32, :30].min() == 255
    # external_code.pixel_perfect_resolution: k = max(64/100, 64/200) * 100 = 64; fill: min(...) * 100 = 32
    assert pixel_perfect_resolution((200, 100), 64, 64, "Crop and Resize") == 64
    assert pixel_perfect_resolution((200, 100), 64, 64, "Resize and Fill") == 32


def test_inpaint_module_marks_masked_pixels_minus_one():
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    hint = build_hint(ControlNetUnit(image=image, module="inpaint"), 16, 16, mask=mask)
    assert torch.equal(hint[0, :, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.equal(hint[0, :, 0, 15], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ParameterError, match="needs an inpainting mask"):
        build_hint(ControlNetUnit(image=image, module="inpaint"), 16, 16)


def _network(seed: int = 0) -> ControlNet:
    torch.manual_seed(seed)
    model = ControlNetModel(ControlNetConfig.for_base(TINY.unet, TINY.vae.downsampling_factor)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return ControlNet(model, "tiny", "00000000")


def test_soft_weights_guidance_window_and_cond_only():
    network = _network()
    unit = ControlNetUnit(weight=0.5)
    scales = unit.soft_scales(5, soft=True)
    assert scales == pytest.approx([0.5 * 0.825**4, 0.5 * 0.825**3, 0.5 * 0.825**2, 0.5 * 0.825, 0.5])
    hint = torch.rand(1, 3, 16, 16)
    x, t, context = torch.randn(4, 4, 8, 8), torch.tensor(300.0), torch.randn(4, 3, TINY.unet.context_dim)
    window = ActiveUnit(network, hint, (1.0,) * 5, start=0.2, end=0.6, cond_only=False)
    # A1111's rule over 10 steps: active where 0.2 <= k/10 <= 0.6, i.e. k = 2..6
    active = [k for k in range(10) if control_residuals([window], k, 10, batch=2)(x, t, context) is not None]
    assert active == [2, 3, 4, 5, 6]
    full = control_residuals([window], 3, 10, batch=2)(x, t, context)
    cond_only = ActiveUnit(network, hint, (1.0,) * 5, start=0.0, end=1.0, cond_only=True)
    half = control_residuals([cond_only], 3, 10, batch=2)(x, t, context)
    assert full is not None and half is not None
    for a, b in zip(full, half, strict=True):
        assert torch.allclose(a[:2], b[:2], atol=1e-6) and b[2:].abs().max() == 0 and a[2:].abs().max() > 0


def test_infotext_round_trip_and_a1111_file():
    unit = ControlNetUnit(module="canny", model="cn [abcd1234]", weight=0.75, guidance_end=0.8,
                          control_mode="My prompt is more important", pixel_perfect=True)  # fmt: skip
    request = GenerationRequest(prompt="p", seed=1, width=64, height=64, controlnet=(unit, unit))
    text = to_infotext(request)
    assert (
        'ControlNet 1: "Module: canny, Model: cn [abcd1234], Weight: 0.75, Resize Mode: Crop and Resize'
        in text
    )
    assert from_infotext(text).request.controlnet == (unit, unit)
    parsed = from_infotext((DATA / "14-v1.6-controlnet-unit.txt").read_text(encoding="utf-8"))
    first, second = parsed.request.controlnet
    assert (first.module, first.model, first.threshold_a, first.pixel_perfect) == (
        "canny",
        "control_v11p_sd15_canny [d14c016b]",
        100,
        True,
    )
    assert (second.weight, second.guidance_end, second.control_mode) == (
        0.6,
        0.8,
        "My prompt is more important",
    )
    assert "ControlNet 0" not in parsed.unused
    old = from_infotext((DATA / "15-v1.5-controlnet-1.1-lowercase.txt").read_text(encoding="utf-8"))
    assert old.request.controlnet == () and "ControlNet 0" in old.unused  # the old format is kept verbatim


def test_bad_control_images_and_files(tmp_path):
    unit = ControlNetUnit(image=Image.new("I;16", (8, 8)), network=_network())
    assert build_hint(unit, 16, 16).shape == (1, 3, 16, 16)  # 16-bit grey converts like any image
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for name, tensors in (
        ("lora", {"lora_controlnet": torch.zeros(1)}),
        ("diff", {"difference": torch.zeros(1)}),
    ):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(UnknownArchitectureError, match="does not load"):
            load_controlnet(tmp_path / f"{name}.safetensors")
    save_controlnet(tmp_path / "cn.safetensors", _network().model)
    model_args = ["generate", "p", "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "out")]
    assert (
        main([*model_args, "--controlnet", str(tmp_path / "cn.safetensors"), "--control-image", str(corrupt)])
        == 2
    )
    assert main([*model_args, "--controlnet", str(tmp_path / "cn.safetensors")]) == 2


def test_cli_generates_with_two_units(tmp_path, tiny_checkpoint, capsys):
    paths = []
    for seed in (0, 1):
        paths.append(save_controlnet(tmp_path / f"cn{seed}.safetensors", _network(seed).model))
    Image.fromarray(square(32)).save(tmp_path / "edges.png")
    argv = ["generate", "an apple", "--model", str(tiny_checkpoint), "--steps", "2", "--size", "32x32",
            "--out", str(tmp_path / "out"), "--seed", "3"]  # fmt: skip
    for path in paths:
        argv += ["--controlnet", str(path)]
    argv += ["--control-image", str(tmp_path / "edges.png"), "--control-module", "canny", "--control-module",
             "none", "--control-weight", "0.5", "--control-mode", "control"]  # fmt: skip
    assert main(argv) == 0
    written = sorted((tmp_path / "out").glob("*.png"))
    info = Image.open(written[0]).info["parameters"]
    assert (
        'ControlNet 0: "Module: canny, Model: cn0 [' in info
        and "Control Mode: ControlNet is more important" in info
    )
    assert 'ControlNet 1: "Module: none, Model: cn1 [' in info and "Weight: 0.5" in info
    loaded = load_controlnet(paths[0])
    assert loaded.model.config == _network().model.config


def test_hires_and_inpaint_passes_use_their_own_hint_sizes(tiny_checkpoint, monkeypatch):
    import latentforge
    from latentforge.pipelines import controlnet as cn
    from latentforge.pipelines.request import Hires, InitImage, Inpaint

    model = latentforge.load(tiny_checkpoint)
    calls = []
    real = cn.prepare_units

    def spy(units, width, height, *args, **kwargs):
        calls.append((width, height, kwargs["hires"], kwargs["mask"] is not None, kwargs["crop"]))
        return real(units, width, height, *args, **kwargs)

    monkeypatch.setattr(cn, "prepare_units", spy)
    unit = ControlNetUnit(image=Image.fromarray(square(48)), network=_network(), module="canny")
    hires = GenerationRequest(prompt="a", steps=2, width=32, height=32, seed=1, controlnet=(unit,),
                              hires=Hires(scale=1.5, steps=1))  # fmt: skip
    result = latentforge.run(model, hires, progress=False)
    assert calls == [(32, 32, False, False, None), (48, 48, True, False, None)] and result[0].size == (48, 48)
    assert (
        "Hires upscale: 1.5" in result[0].info["parameters"]
        and "ControlNet 0" in result[0].info["parameters"]
    )
    calls.clear()
    picture, mask = Image.new("RGB", (32, 32), "gray"), Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    inpaint_unit = ControlNetUnit(image=picture, network=_network(), module="inpaint_only")
    request = GenerationRequest(prompt="a", steps=2, seed=1, init=InitImage((picture,), 0.8),
                                inpaint=Inpaint(mask=mask), controlnet=(inpaint_unit,))  # fmt: skip
    assert latentforge.run(model, request, progress=False)[0].size == (32, 32)
    assert calls == [(32, 32, False, True, None)]
    calls.clear()  # "Only masked": the control image of the init image's size is cropped like it
    only = replace(request, inpaint=Inpaint(mask=mask, only_masked=True, only_masked_padding=0, mask_blur=0))
    assert latentforge.run(model, only, progress=False)[0].size == (32, 32)
    assert calls == [(32, 32, False, True, ((32, 32), (8, 8, 24, 24)))]


def test_units_from_an_infotext_are_dropped_with_a_warning_and_unknown_names_refused(tiny_checkpoint):
    import latentforge
    from latentforge.pipelines.request import resolve

    model = latentforge.load(tiny_checkpoint)
    described = GenerationRequest(prompt="a", controlnet=(ControlNetUnit(module="canny", model="x [1]"),))
    with pytest.warns(UserWarning, match="ControlNet unit 0 .* left out"):
        assert resolve(described, model).request.controlnet == ()
    image = Image.new("RGB", (8, 8))
    for bad, match in (
        (ControlNetUnit(image=image), "no ControlNet is loaded"),
        (
            ControlNetUnit(image=image, network=_network(), control_mode="loud"),
            "unknown ControlNet control mode",
        ),
        (
            ControlNetUnit(image=image, network=_network(), resize_mode="zoom"),
            "unknown ControlNet resize mode",
        ),
        (ControlNetUnit(image=image, network=_network(), weight=float("nan")), "weight must be a number"),
        (ControlNetUnit(image=image, network=_network(), guidance_start=0.8, guidance_end=0.2), "is after"),
        (ControlNetUnit(network=_network()), "no control image"),
    ):
        with pytest.raises(ParameterError, match=match):
            resolve(GenerationRequest(prompt="a", controlnet=(bad,)), model)
    sd2 = ControlNet(ControlNetModel(ControlNetConfig.for_base(replace(TINY.unet, context_dim=8), 2)), "sd2")
    with pytest.raises(ParameterError, match="another model family"):
        resolve(GenerationRequest(prompt="a", controlnet=(ControlNetUnit(image=image, network=sd2),)), model)


def test_a_controlnet_in_another_dtype_runs_with_a_bf16_model(tiny_checkpoint):
    import latentforge

    model = latentforge.load(tiny_checkpoint, dtype=torch.bfloat16)
    unit = ControlNetUnit(image=Image.fromarray(square(32)), network=_network(), module="canny")  # float32
    images = latentforge.txt2img(model, "a", steps=1, width=32, height=32, seed=0, controlnet=(unit,))
    assert images[0].size == (32, 32)
