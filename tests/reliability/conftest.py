"""Fixtures of the reliability suite: a tiny random model file (families.TINY) and a small valid image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from latentforge.checkpoints.single_file import save_single_file
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """families.TINY with random weights as one original-layout .safetensors file."""
    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_single_file(
        path, model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), TINY
    )
    return path


@pytest.fixture
def image_8(tmp_path) -> Path:
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path
