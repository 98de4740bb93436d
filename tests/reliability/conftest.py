"""Fixtures of the reliability suite: a tiny random model file (families.TINY) and a small valid image."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def image_8(tmp_path) -> Path:
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path
