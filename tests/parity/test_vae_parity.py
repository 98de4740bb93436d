"""Parity of our AutoencoderKL with diffusers' (same random weights, fp32), and full-size key inventories.

The full-size SD VAE is built on the `meta` device and checked against diffusers' model and against
`convert_ldm_vae_checkpoint`, diffusers' own reader of original single-file checkpoints.
"""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from latentforge.checkpoints.keymap_vae import diffusers_to_ours, ours_to_diffusers
from latentforge.models.configs import VAEConfig
from latentforge.models.families import SD_VAE
from latentforge.models.vae import AutoencoderKL
from references import assert_close, diffusers_vae_config, randomize_norms

F4 = VAEConfig(ch=32, ch_mult=(1, 2, 2), norm_groups=16)
F8 = VAEConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=2, norm_groups=8)


@pytest.mark.parametrize("config", [F4, F8], ids=["f4", "f8"])
def test_matches_diffusers(config):
    ours = AutoencoderKL(config).eval()
    randomize_norms(ours)
    reference = DiffusersAutoencoderKL(**diffusers_vae_config(config)).eval()
    reference.load_state_dict(ours_to_diffusers(ours.state_dict(), config), strict=True)
    f = config.downsampling_factor
    x = torch.rand(2, config.in_channels, 3 * f, 2 * f) * 2 - 1  # non-square, odd latent height
    with torch.no_grad():
        posterior = ours.encode(x)
        reference_posterior = reference.encode(x).latent_dist
        z = torch.randn_like(posterior.mean)
        decoded, reference_decoded = ours.decode(z), reference.decode(z).sample
    assert_close(posterior.mean, reference_posterior.mean)
    assert_close(posterior.logvar, reference_posterior.logvar)
    assert_close(decoded, reference_decoded)


def _meta_state(config: VAEConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AutoencoderKL(config).state_dict()


def test_sd_vae_keys_map_one_to_one_onto_diffusers():
    with torch.device("meta"):
        reference = DiffusersAutoencoderKL(**diffusers_vae_config(SD_VAE))
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    ours = _meta_state(SD_VAE)
    converted = ours_to_diffusers(ours, SD_VAE)
    assert len(converted) == len(ours)
    assert {k: v.shape for k, v in converted.items()} == expected
    back = diffusers_to_ours(reference.state_dict(), SD_VAE)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_sd_vae_keys_agree_with_diffusers_single_file_converter():
    ours = _meta_state(SD_VAE)
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, diffusers_vae_config(SD_VAE))
    mine = ours_to_diffusers(ours, SD_VAE)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in mine.items()}
