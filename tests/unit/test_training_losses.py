"""Diffusion and autoencoder loss helpers, PSNR and SSIM (against torchmetrics)."""

import math

import pytest
import torch

from latentforge.sampling import schedules
from latentforge.training import losses


def _abar(batch: int) -> torch.Tensor:
    abar = schedules.alphas_cumprod(schedules.betas("scaled_linear"))
    return abar[torch.linspace(0, 999, batch).long()]


def test_v_target_recovers_x0_and_eps():
    x0, eps = torch.randn(6, 4, 8, 8, dtype=torch.float64), torch.randn(6, 4, 8, 8, dtype=torch.float64)
    abar = _abar(6)
    x_t = losses.add_noise(x0, eps, abar)
    v = losses.v_target(x0, eps, abar)
    torch.testing.assert_close(losses.x0_from_v(x_t, v, abar), x0)
    # eps = sqrt(abar) v + sqrt(1 - abar) x_t (Salimans & Ho 2022, appendix D)
    view = (-1, 1, 1, 1)
    eps_back = abar.sqrt().view(view) * v + (1 - abar).sqrt().view(view) * x_t
    torch.testing.assert_close(eps_back, eps)


def test_diffusion_target_per_prediction():
    x0, eps, abar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), _abar(2)
    assert losses.diffusion_target("epsilon", x0, eps, abar) is eps
    assert losses.diffusion_target("x0", x0, eps, abar) is x0
    torch.testing.assert_close(losses.diffusion_target("v", x0, eps, abar), losses.v_target(x0, eps, abar))
    with pytest.raises(ValueError, match="valid"):
        losses.diffusion_target("flow", x0, eps, abar)  # type: ignore[arg-type]


def test_min_snr_weights_at_known_snrs():
    snr = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(
        losses.min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]).double()
    )
    torch.testing.assert_close(
        losses.min_snr_weights(snr, 5.0, "v"), torch.tensor([0.5, 5 / 6, 5 / 21]).double()
    )
    torch.testing.assert_close(losses.min_snr_weights(snr, 5.0, "x0"), torch.tensor([1.0, 5.0, 5.0]).double())


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weighted_loss_equals_clipped_snr_times_x0_loss(prediction):
    """Hang et al. eq. 9: the weighted eps/v MSE is min(SNR, gamma) times the MSE of the implied x0."""
    gamma = 5.0
    x0, eps, abar = torch.randn(8, 4, 4, 4).double(), torch.randn(8, 4, 4, 4).double(), _abar(8)
    x_t = losses.add_noise(x0, eps, abar)
    target = losses.diffusion_target(prediction, x0, eps, abar)
    pred = target + 0.1 * torch.randn_like(target)
    view = (-1, 1, 1, 1)
    if prediction == "epsilon":
        x0_pred = (x_t - (1 - abar).sqrt().view(view) * pred) / abar.sqrt().view(view)
    else:
        x0_pred = losses.x0_from_v(x_t, pred, abar)
    mse_pred = (pred - target).pow(2).flatten(1).mean(1)
    mse_x0 = (x0_pred - x0).pow(2).flatten(1).mean(1)
    snr = losses.snr(abar)
    weighted = losses.min_snr_weights(snr, gamma, prediction) * mse_pred
    torch.testing.assert_close(weighted, snr.clamp(max=gamma) * mse_x0)


def test_snr_matches_model_sigmas():
    abar = schedules.alphas_cumprod(schedules.betas("scaled_linear"))
    torch.testing.assert_close(losses.snr(abar), schedules.model_sigmas(abar) ** -2)


def test_noise_offset_is_constant_per_channel():
    shape = (3, 4, 8, 8)
    plain = losses.sample_noise(shape, torch.Generator().manual_seed(0))
    offset = losses.sample_noise(shape, torch.Generator().manual_seed(0), offset=0.1)
    assert plain.shape == offset.shape == shape
    shift = offset - plain  # [B, C, H, W], the same value over each (sample, channel)
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape))
    assert shift.abs().max() > 0
    assert shift[:, :, 0, 0].unique().numel() == 12


def test_timesteps_cover_the_range_uniformly():
    t = losses.sample_timesteps(20000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 999
    assert abs(float(t.float().mean()) - 499.5) < 10


def test_weighted_mse():
    pred, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert float(losses.weighted_mse(pred, target)) == pytest.approx(2.5)
    assert float(losses.weighted_mse(pred, target, torch.tensor([1.0, 0.0]))) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- autoencoder


def test_reconstruction_and_kl():
    x = torch.zeros(2, 3, 4, 4)
    assert float(losses.reconstruction_loss(x, x + 0.5, "l1")) == pytest.approx(0.5)
    assert float(losses.reconstruction_loss(x, x + 0.5, "l2")) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="valid"):
        losses.reconstruction_loss(x, x, "l3")  # type: ignore[arg-type]
    assert float(losses.kl_loss(torch.tensor([48.0, 96.0]), 48)) == pytest.approx(1.5)


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # D: 0.5 * (mean(relu(1 - [2, 0])) + mean(relu(1 + [-2, 0.5]))) = 0.5 * (0.5 + 0.75)
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.625)
    assert float(losses.hinge_g_loss(fake)) == pytest.approx(0.75)


def test_discriminator_shape_and_frozen_call_gradients():
    disc = losses.NLayerDiscriminator(3, width=8, n_layers=3)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = losses.frozen_call(disc, x)
    assert logits.shape == (2, 1, 2, 2)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())


def test_adaptive_weight_is_gradient_norm_ratio():
    last = torch.nn.Parameter(torch.ones(3))
    rec, g = (last * torch.tensor([3.0, 0.0, 4.0])).sum(), (last * 2.0).sum()  # grads: |(3,0,4)| = 5, |2,2,2|
    weight = losses.adaptive_weight(rec, g, last)
    assert float(weight) == pytest.approx(5 / (math.sqrt(12) + 1e-4))
    assert not weight.requires_grad


# ------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_known_values():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.isinf(losses.psnr(x, x)).all()
    # MSE 0.01 over a data range of 2: 10 log10(4 / 0.01) = 26.0206 dB
    torch.testing.assert_close(losses.psnr(x, x + 0.1), torch.full((2,), 10 * math.log10(400)).double())


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    torch.testing.assert_close(losses.ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    preds = (target + 0.3 * torch.randn(target.shape, generator=gen)).clamp(-1, 1)
    theirs, full_map = tm.structural_similarity_index_measure(
        preds.double(), target.double(), data_range=2.0, reduction="none", return_full_image=True
    )
    ours_reflect = losses.ssim(preds, target, data_range=2.0, padding="reflect")
    torch.testing.assert_close(ours_reflect, theirs, rtol=1e-6, atol=1e-6)
    # Away from the border the map does not depend on padding: its interior mean is the "valid" SSIM.
    ours_valid = losses.ssim(preds, target, data_range=2.0)
    torch.testing.assert_close(ours_valid, full_map[..., 5:-5, 5:-5].flatten(1).mean(1), rtol=1e-6, atol=1e-6)
    assert 0.2 < float(ours_valid.mean()) < 0.95  # a distorted image: neither identical nor unrelated
    assert float((ours_valid - ours_reflect).abs().max()) > 1e-4  # the two conventions do differ


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="window"):
        losses.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
