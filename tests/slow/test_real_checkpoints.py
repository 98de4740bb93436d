"""A real checkpoint, if the user points at one: LATENTFORGE_CHECKPOINT=/path/to/model.safetensors (or a
diffusers folder) pytest -m slow tests/slow. Loads it, prints family and hash, and generates one
512x512 image in 20 steps that must not be one flat colour. LATENTFORGE_DEVICE picks the device (cpu).
"""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import latentforge
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run

CHECKPOINT = os.environ.get("LATENTFORGE_CHECKPOINT")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHECKPOINT, reason="set LATENTFORGE_CHECKPOINT to a real SD checkpoint"),
]


@pytest.fixture(scope="module")
def model() -> latentforge.StableDiffusion:
    device = os.environ.get("LATENTFORGE_DEVICE", "cpu")
    dtype = torch.float32 if device == "cpu" else torch.float16
    start = time.perf_counter()
    bundle = latentforge.load(Path(CHECKPOINT), dtype=dtype, device=device)
    family = bundle.family
    print(
        f"\n{CHECKPOINT}: family {family.name}, hash {bundle.short_hash}, prediction {family.prediction}, "
        f"text encoder {family.text_encoder.layers} layers (default clip skip {family.default_clip_skip}), "
        f"loaded in {time.perf_counter() - start:.1f}s"
    )
    return bundle


def test_loads_a_known_family(model):
    assert model.family.unet.model_channels == 320
    assert all(not p.is_meta for p in model.unet.parameters())
    if Path(CHECKPOINT).is_file():
        assert model.short_hash is not None and len(model.short_hash) == 10


def test_generates_a_picture(model, tmp_path):
    params = GenerationRequest(
        prompt="a photograph of a red apple on a wooden table, studio lighting",
        negative_prompt="blurry",
        steps=20,
        width=512,
        height=512,
        seed=1234,
    )
    start = time.perf_counter()
    (result,) = run(model, params, progress=False)
    print(f"512x512, 20 steps: {time.perf_counter() - start:.1f}s; {result.infotext!r}")
    result.image.save(tmp_path / "apple.png")
    pixels = np.asarray(result.image, dtype=np.float32)
    assert pixels.shape == (512, 512, 3)
    assert np.isfinite(result.latents.numpy()).all()
    assert pixels.std() > 10, f"image is (nearly) one colour: std {pixels.std():.2f}"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
