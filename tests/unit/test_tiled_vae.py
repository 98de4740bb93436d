"""Tiled VAE: tile layout, ramp weights, exactness on a local network, measured error on the KL-VAE."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.images import decode_latents, encode_images
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from latentforge.pipelines.tiled_vae import _ramp, decode_tiled, encode_tiled, tile_starts, tiled_apply


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def test_tiles_cover_the_image_with_the_last_flush():
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(100, 40, 16) == [0, 24, 48, 60]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 16, 16)


def test_ramps_sum_to_one_across_an_overlap():
    left = _ramp(40, True, False, 16, 4)
    right = _ramp(40, False, True, 16, 4)
    total = torch.zeros(64, dtype=torch.float64)
    total[:40] += left
    total[24:] += right
    assert torch.allclose(total, torch.ones(64, dtype=torch.float64))
    assert left[-4:].eq(0).all() and right[:4].eq(0).all()  # margins next to a tile edge get no weight


def test_local_network_is_reproduced_exactly():
    """A network whose receptive field fits the overlap margin gives the untiled output."""
    torch.manual_seed(1)
    conv1, conv2 = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)

    def decode(z: torch.Tensor) -> torch.Tensor:  # receptive field 1.5 latent pixels < margin 4
        return conv2(F.interpolate(conv1(z), scale_factor=2.0))

    def encode(x: torch.Tensor) -> torch.Tensor:
        return conv1(F.avg_pool2d(F.pad(x, (0, 0, 0, 0)), 2).repeat(1, 2, 1, 1)[:, :4])

    z, x = torch.randn(2, 4, 56, 40), torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        assert (decode(z) - tiled_apply(decode, z, tile=24, overlap=16, scale=2)).abs().max() < 1e-5
        tiled = tiled_apply(encode, x, tile=48, overlap=32, scale=0.5, align=2)
        assert (encode(x) - tiled).abs().max() < 1e-5


def test_kl_vae_tiling_is_a_close_approximation(model):
    """GroupNorm statistics and mid-block attention are global: an approximation (0.013 mean, 0.095 max)."""
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    full, _ = decode_latents(model, latents)
    tiled = decode_tiled(model, latents, tile=32, overlap=16)
    error = (full - tiled).abs()
    assert error.mean() < 0.03 and error.max() < 0.2
    assert error.max() > 1e-4  # it is an approximation, not the same computation
    pixels = full.clamp(-1, 1)
    enc_error = (encode_images(model, pixels) - encode_tiled(model, pixels, tile=64, overlap=32)).abs()
    assert enc_error.mean() < 0.01 and enc_error.max() < 0.05


def test_tiling_switches_on_above_the_pixel_threshold(model):
    params = GenerationRequest(prompt="x", steps=2, sampler="Euler", seed=3, width=64, height=48)
    plain = run(model, params, progress=False)[0]
    auto = run(model, replace(params, tiled_vae_pixels=32 * 32), progress=False)[0]
    forced_off = run(model, replace(params, tiled_vae_pixels=32 * 32, tiled_vae=False), progress=False)[0]
    assert "Tiled VAE" not in plain.infotext and "Tiled VAE: True" in auto.infotext
    assert torch.equal(plain.latents, auto.latents)  # only the decode changes
    assert forced_off.image.tobytes() == plain.image.tobytes()
