"""The banded VAE decode equals the plain decode up to summation order (fp32, random tiny weights)."""

import pytest
import torch

from latentforge.models.configs import VAEConfig
from latentforge.models.vae import AutoencoderKL
from latentforge.models.vae_banded import decode_banded

F4 = VAEConfig(ch=16, ch_mult=(1, 2, 2), norm_groups=8)
F8 = VAEConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=2, norm_groups=8, z_channels=3, embed_dim=3)


def _vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".norm" in name or "norm_out" in name:  # GroupNorm affine: not the 1/0 defaults
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.3))
    return vae


@pytest.mark.parametrize(
    ("config", "height", "width", "band_rows"),
    [
        (F4, 5, 7, 3),  # 20 output rows in bands of 3 rows (the last band 2 rows)
        (F4, 4, 4, 1),  # one row per band, every band at an edge or one row from it
        (F4, 3, 6, 5),
        (F8, 3, 5, 7),  # 24 rows: 7, 7, 7, 3
        (F8, 2, 3, 1000),  # one band: the plain order of layers
        (F8, 1, 1, 3),  # 8 x 8 image
    ],
)
def test_banded_decode_equals_plain(config, height, width, band_rows):
    vae = _vae(config)
    torch.manual_seed(1)
    z = torch.randn(2, config.embed_dim, height, width) * 2 + 0.5  # nonzero mean: the statistics matter
    f = config.downsampling_factor
    with torch.no_grad():
        plain = vae.decode(z)
        banded = decode_banded(vae, z, band_pixels=band_rows * width * f)
    assert banded.shape == plain.shape == (2, config.out_channels, height * f, width * f)
    scale = (plain.max() - plain.min()).item()
    assert (banded - plain).abs().max().item() <= 1e-5 * scale


def test_banded_decode_channels_last_and_bf16_match_plain():
    vae = _vae(F4).to(torch.bfloat16)
    z = (torch.randn(1, F4.embed_dim, 6, 5) + 0.5).to(torch.bfloat16)
    z = z.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain, banded = vae.decode(z).float(), decode_banded(vae, z, band_pixels=3 * 5 * 4).float()
    # bf16 keeps 8 bits: each layer rounds in a different place, so a few bf16 steps of the output range
    assert (banded - plain).abs().max().item() <= 0.05 * (plain.max() - plain.min()).item()


def test_decode_latents_bands_above_the_pixel_threshold(monkeypatch):
    from latentforge.model import StableDiffusion
    from latentforge.models.families import TINY
    from latentforge.pipelines import images

    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY).eval()
    latents = torch.randn(1, 4, 9, 6, generator=torch.Generator().manual_seed(0))
    plain, _ = images.decode_latents(model, latents)
    calls = []

    def counted(vae, z):
        calls.append(z.shape)
        return decode_banded(vae, z, band_pixels=2 * z.shape[-1])

    monkeypatch.setattr(images, "decode_banded", counted)
    monkeypatch.setattr(images, "BANDED_DECODE_PIXELS", 0)
    banded, _ = images.decode_latents(model, latents)
    assert calls and banded.shape == plain.shape
    assert (banded - plain).abs().max().item() <= 1e-5 * (plain.max() - plain.min()).item()


@pytest.mark.parametrize(("height", "width", "band_rows"), [(5, 7, 3), (4, 3, 1)])
def test_banded_decode_in_float64_is_the_same_computation(height, width, band_rows):
    """In float64 the summation order leaves ~1e-15: anything above 1e-10 would be a real difference."""
    vae = _vae(F8).double()
    z = torch.randn(1, F8.embed_dim, height, width, dtype=torch.float64) + 0.5
    with torch.no_grad():
        plain = vae.decode(z)
        banded = decode_banded(vae, z, band_pixels=band_rows * width * F8.downsampling_factor)
    assert (banded - plain).abs().max().item() <= 1e-10 * (plain.max() - plain.min()).item()
