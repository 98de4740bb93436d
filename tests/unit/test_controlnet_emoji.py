"""The canny ControlNet shipped beside the embedded model: it loads by name, its keys are its family's
inventory, weight 0 is no ControlNet, the server lists it; the demo's edge score on a hand-computed case."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from latentforge.checkpoints.controlnet import (
    EMBEDDED_CONTROLNETS,
    PREFIX,
    controlnet_path,
    load_controlnet,
)
from latentforge.checkpoints.loading import default_model_path
from latentforge.model import load
from latentforge.models.controlnet import ControlNetConfig, ControlNetModel
from latentforge.pipelines.controlnet import ControlNetUnit
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import iter_images
from latentforge.server.jobs import Catalog

ROOT = Path(__file__).resolve().parents[2]
NAME = "latentforge-emoji-canny"


def _load_script(name: str):  # noqa: ANN202 (a module)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_demo = _load_script("controlnet_demo")


@pytest.fixture(scope="module")
def model():
    return load(default_model_path())


def test_shipped_file_is_the_embedded_families_controlnet_in_fp16(model):
    path = controlnet_path(NAME)
    assert path.parent == default_model_path().parent and path.name == EMBEDDED_CONTROLNETS[NAME]
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open)
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    config = ControlNetConfig.for_base(model.family.unet, model.family.vae.downsampling_factor)
    with torch.device("meta"):
        want = {PREFIX + k: tuple(v.shape) for k, v in ControlNetModel(config).state_dict().items()}
    assert shapes == want
    assert dtypes == {"F16"}
    assert path.stat().st_size < 16 * 2**20


def test_loads_by_name_and_paths_still_win(tmp_path, monkeypatch):
    network = load_controlnet(NAME)
    assert network.name == NAME and len(network.short_hash) == 8
    assert network.model.config.unet == load(default_model_path()).family.unet
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()  # a folder of that name in the working directory is what the name means there
    assert controlnet_path(NAME) == Path(NAME)
    assert controlnet_path("other.safetensors") == Path("other.safetensors")


def test_weight_zero_equals_no_controlnet_on_the_embedded_model(model):
    network = load_controlnet(NAME, dtype=model.dtype, device=model.device)
    hint = Image.new("RGB", (64, 64))
    hint.paste((255, 255, 255), (16, 16, 48, 17))  # a one-pixel edge
    base = GenerationRequest(prompt="red apple, google style", seed=3, steps=2, width=64, height=64)
    unit = ControlNetUnit(image=hint, network=network, weight=0.0, resize_mode="Just Resize")
    without = next(iter_images(model, base)).image
    zero = next(iter_images(model, replace(base, controlnet=(unit,)))).image
    assert np.array_equal(np.asarray(zero), np.asarray(without))
    one = ControlNetUnit(image=hint, network=network, weight=1.0, resize_mode="Just Resize")
    full = next(iter_images(model, replace(base, controlnet=(one,)))).image
    assert not np.array_equal(np.asarray(full), np.asarray(without))


def test_server_lists_it_with_the_embedded_model_only(tmp_path):
    embedded = Catalog(None, default_model_path())
    assert [p.stem for p in embedded.controlnets()] == [NAME]
    assert embedded.find_controlnet(NAME) == controlnet_path(NAME)
    (tmp_path / "ControlNet").mkdir()
    assert Catalog(tmp_path, None).controlnets() == []
    assert Catalog(None, tmp_path / "other.safetensors").controlnets() == []


def test_edge_scores_on_a_hand_computed_case():
    """Control: a 4-pixel horizontal line in row 2; generated: the same line one row lower (row 3) plus a
    stray pixel far away. Exact: no overlap, IoU 0 / 9. Within 1 px: the 4 shifted pixels are near the
    control line, the stray one is not: precision 4/5; every control pixel has a generated one below it:
    recall 4/4; F1 = 2 * 0.8 * 1 / 1.8 = 8/9."""
    control = np.zeros((8, 8), bool)
    control[2, 1:5] = True
    generated = np.zeros((8, 8), bool)
    generated[3, 1:5] = True
    generated[7, 7] = True
    scores = _demo.edge_scores(control, generated, tolerance=1)
    assert scores["iou"] == 0.0
    assert scores["precision"] == pytest.approx(4 / 5)
    assert scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(8 / 9)
    exact = _demo.edge_scores(control, generated, tolerance=0)
    assert exact["precision"] == exact["recall"] == exact["f1"] == 0.0
    same = _demo.edge_scores(control, control)
    assert same == {"iou": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    half = control.copy()
    half[2, 3:5] = False  # 2 of the 4 pixels: IoU 2/4, precision 1, recall 3/4 (pixel 3 is 1 px from 2)
    scores = _demo.edge_scores(control, half)
    assert scores["iou"] == 0.5 and scores["precision"] == 1.0 and scores["recall"] == 0.75
    empty = np.zeros((8, 8), bool)
    assert _demo.edge_scores(empty, empty)["f1"] == 1.0 and _demo.edge_scores(control, empty)["f1"] == 0.0


def test_near_is_the_chessboard_neighbourhood():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True
    assert _demo.near(mask, 1).sum() == 4  # the corner's 2x2 (the frame is not wrapped)
    mask[0, 0], mask[2, 2] = False, True
    assert _demo.near(mask, 1).sum() == 9 and _demo.near(mask, 2).all()


def test_cli_generates_with_the_shipped_name(tmp_path):
    from PIL import ImageDraw

    from latentforge.cli import main

    control = tmp_path / "control.png"
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).ellipse((12, 12, 52, 52), fill="red")
    drawing.save(control)
    argv = ["generate", "red apple, google style", "--steps", "2", "--out", str(tmp_path / "out"),
            "--controlnet", NAME, "--control-image", str(control), "--control-module", "canny",
            "--control-pixel-perfect"]  # fmt: skip
    assert main(argv) == 0
    (written,) = sorted((tmp_path / "out").glob("*.png"))
    assert f"Model: {NAME} [" in Image.open(written).info["parameters"]
