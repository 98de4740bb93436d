"""Shared test set-up: deterministic, single-threaded torch so that xdist workers share the cores."""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


# One run of the default suite writes about 2 GiB of models and images under the temp folder.
# With less room than this it would end in hundreds of setup errors after a long wait, so it stops first.
MIN_FREE_TEMP_BYTES = 3 * 2**30


def pytest_configure(config):
    torch.set_num_threads(1)
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has checked already
        return
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < MIN_FREE_TEMP_BYTES:
        pytest.exit(
            f"{tempfile.gettempdir()}: {free / 2**30:.1f} GiB free, the test suite needs "
            f"{MIN_FREE_TEMP_BYTES / 2**30:.0f} GiB; free some space or set TMPDIR",
            returncode=2,
        )


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
