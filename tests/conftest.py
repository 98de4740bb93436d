"""Shared test set-up: deterministic, single-threaded torch so that xdist workers share the cores."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """families.TINY with random weights (seed 0) as one original-layout .safetensors file."""
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.model import StableDiffusion
    from latentforge.models.families import TINY

    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_single_file(
        path, model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), TINY
    )
    return path
