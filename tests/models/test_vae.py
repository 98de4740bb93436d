"""Contract tests for the KL autoencoder, its posterior and the diffusers key map on tiny configs."""

import pytest
import torch

from latentforge.checkpoints.keymap_vae import diffusers_to_ours, ours_to_diffusers
from latentforge.models.configs import VAEConfig
from latentforge.models.vae import AutoencoderKL, DiagonalGaussian

F4 = VAEConfig(ch=16, ch_mult=(1, 2, 2), norm_groups=8)
F8 = VAEConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=2, norm_groups=8, z_channels=3, embed_dim=3)


def _image(size: int = 16) -> torch.Tensor:
    return torch.rand(2, 3, size, size) * 2 - 1


@pytest.mark.parametrize("config", [F4, F8, VAEConfig()])
def test_shapes_follow_the_downsampling_factor(config):
    model = AutoencoderKL(config)
    size = 2 * config.downsampling_factor
    posterior = model.encode(_image(size))
    latent_shape = (
        2,
        config.embed_dim,
        size // config.downsampling_factor,
        size // config.downsampling_factor,
    )
    assert posterior.mean.shape == posterior.logvar.shape == latent_shape
    assert model.decode(posterior.mode()).shape == (2, config.out_channels, size, size)


def test_original_module_layout():
    keys = AutoencoderKL(F8).state_dict().keys()
    last = len(F8.ch_mult) - 1
    assert {f"encoder.down.{i}.downsample.conv.weight" for i in range(last)} <= keys
    assert f"encoder.down.{last}.downsample.conv.weight" not in keys
    assert {f"decoder.up.{i}.upsample.conv.weight" for i in range(1, last + 1)} <= keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert f"decoder.up.0.block.{F8.num_res_blocks}.conv1.weight" in keys
    assert f"decoder.up.0.block.{F8.num_res_blocks + 1}.conv1.weight" not in keys
    assert {f"encoder.mid.attn_1.{n}.weight" for n in ("norm", "q", "k", "v", "proj_out")} <= keys
    assert {"quant_conv.weight", "post_quant_conv.weight"} <= keys


def test_deterministic():
    model = AutoencoderKL(F4).eval()
    x = _image()
    assert torch.equal(model.encode(x).mean, model.encode(x).mean)
    z = torch.randn(2, F4.embed_dim, 4, 4)
    assert torch.equal(model.decode(z), model.decode(z))


def test_posterior_sampling_and_clamp():
    moments = torch.randn(2, 8, 3, 3)
    moments[:, 4:][0] = 100.0  # logvar far above the clamp
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max().item() == 20.0
    assert torch.equal(posterior.mode(), moments[:, :4])
    noise = torch.randn(2, 4, 3, 3)
    assert torch.allclose(posterior.sample(noise), posterior.mean + posterior.std * noise)
    draws = [posterior.sample(generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_kl_matches_torch_distributions():
    posterior = DiagonalGaussian(torch.randn(3, 8, 4, 4))
    normal = torch.distributions.Normal(posterior.mean, posterior.std)
    standard = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(normal, standard).sum(dim=(1, 2, 3))
    assert torch.allclose(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype):
    model = AutoencoderKL(F4).to(dtype)
    reconstruction, posterior = model(_image().to(dtype), generator=torch.Generator().manual_seed(0))
    assert reconstruction.dtype == dtype and posterior.mean.dtype == dtype
    assert torch.isfinite(reconstruction).all() and torch.isfinite(posterior.mean).all()


def test_gradients_reach_every_parameter():
    model = AutoencoderKL(F4)
    x = _image()
    reconstruction, posterior = model(x)
    ((reconstruction - x).square().mean() + 1e-3 * posterior.kl().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_state_dict_round_trip_is_strict():
    source, target = AutoencoderKL(F8).eval(), AutoencoderKL(F8).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = _image()
    assert torch.equal(source(x, sample_posterior=False)[0], target(x, sample_posterior=False)[0])


@pytest.mark.parametrize("config", [F4, F8])
def test_diffusers_keymap_round_trips_bit_exactly(config):
    ours = AutoencoderKL(config).state_dict()
    theirs = ours_to_diffusers(ours, config)
    assert len(theirs) == len(ours)
    assert theirs["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    back = diffusers_to_ours(theirs, config)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    again = ours_to_diffusers(back, config)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_diffusers_keymap_reports_unknown_keys():
    theirs = ours_to_diffusers(AutoencoderKL(F4).state_dict(), F4)
    with pytest.raises(ValueError, match="encoder.mid_block.attentions.0.query.weight"):
        diffusers_to_ours({**theirs, "encoder.mid_block.attentions.0.query.weight": torch.zeros(1)}, F4)
