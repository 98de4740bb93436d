"""Loss helpers for latent diffusion and for the KL autoencoder, plus PSNR/SSIM.

Diffusion notation (DDPM, Ho et al. 2020; v from Salimans & Ho 2022, eq. 4 and appendix D):
    abar_t    alphas_cumprod[t]
    x_t       sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                 (forward process, eq. 4 of DDPM)
    v         sqrt(abar_t) eps - sqrt(1 - abar_t) x0;  x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    SNR(t)    abar_t / (1 - abar_t)
Min-SNR-gamma (Hang et al. 2023, eq. 9 and section 3.4) weights the x0-space loss by min(SNR, gamma);
an eps-loss equals SNR times the x0-loss and a v-loss (SNR + 1) times it, so the weight applied to
the eps- or v-space MSE is min(SNR, gamma) / SNR or min(SNR, gamma) / (SNR + 1).

Autoencoder losses follow the LDM autoencoder (`ldm/modules/losses/contperceptual.py`,
`taming/modules/discriminator/model.py`): L1/L2 reconstruction, KL to N(0, I), and a PatchGAN
(pix2pix NLayerDiscriminator) hinge loss with LDM's adaptive weight.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Target = Literal["epsilon", "v", "x0"]


# --------------------------------------------------------------------------------------------------
# Diffusion
# --------------------------------------------------------------------------------------------------


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Integer timesteps [B] uniform in [0, num_timesteps), drawn on the generator's device."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator, device=generator.device)


def sample_noise(
    shape: tuple[int, ...],
    generator: torch.Generator,
    offset: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise; `offset` > 0 adds offset * N(0, 1) per (sample, channel), constant over space.

    The "noise offset" of Guttenberg 2023 (crosslabs.org/blog/diffusion-with-offset-noise), which lets
    the model learn to change an image's mean brightness.
    """
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    if offset:
        per_channel = torch.randn(shape[:2], generator=generator, device=generator.device, dtype=dtype)
        noise = noise + offset * per_channel[(..., *([None] * (len(shape) - 2)))]  # [B, C] -> [B, C, 1, 1]
    return noise


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with `abar` [B] (already indexed by t)."""
    abar = abar.to(torch.float64)
    return _per_sample(abar.sqrt(), x0) * x0 + _per_sample((1 - abar).sqrt(), x0) * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    abar = abar.to(torch.float64)
    return _per_sample(abar.sqrt(), x0) * noise - _per_sample((1 - abar).sqrt(), x0) * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (inverse of `v_target` given x_t)."""
    abar = abar.to(torch.float64)
    return _per_sample(abar.sqrt(), x_t) * x_t - _per_sample((1 - abar).sqrt(), x_t) * v


def diffusion_target(
    prediction: Target, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """What the network regresses onto for `prediction` "epsilon", "v" or "x0"."""
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        return v_target(x0, noise, abar)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}; valid: 'epsilon', 'v', 'x0'")


def snr(abar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar / (1 - abar)."""
    abar = abar.to(torch.float64)
    return abar / (1 - abar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction: Target) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights for an MSE in `prediction` space (Hang et al. 2023)."""
    clipped = snr_values.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr_values
    if prediction == "v":
        return clipped / (snr_values + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction type {prediction!r}; valid: 'epsilon', 'v', 'x0'")


def weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over elements of each sample, then the (weighted) mean over the batch; computed in fp32."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # [B]
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()


# --------------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------------


def reconstruction_loss(
    x: torch.Tensor, recon: torch.Tensor, kind: Literal["l1", "l2"] = "l1"
) -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error over all elements, in fp32."""
    diff = recon.float() - x.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "l2":
        return diff.pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; valid: 'l1', 'l2'")


def kl_loss(kl_per_sample: torch.Tensor, pixels_per_sample: int) -> torch.Tensor:
    """KL summed over latent elements, averaged over the batch, divided by the pixel-element count.

    LDM sums the reconstruction over pixels and adds kl_weight * KL; dividing both by the pixel count
    keeps LDM's meaning of `kl_weight` (SD's VAE: 1e-6) with a per-pixel reconstruction mean.
    """
    return kl_per_sample.float().mean() / pixels_per_sample


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix (Isola et al. 2017) as the LDM autoencoder uses it.

    Conv(4, s2)-LeakyReLU, then `n_layers - 1` Conv(4, s2)-BatchNorm-LeakyReLU, one Conv(4, s1) block and a
    1-channel Conv(4, s1): one logit per overlapping patch, [B, 1, h, w].
    """

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(width * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():  # taming's weights_init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) with gradients to x only, not to the module's parameters (for the generator loss).

    With this, generator and discriminator losses can be summed and stepped by one optimizer: each
    loss only reaches the parameters it should update.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss against a hinge discriminator: -E[D(G(z))]."""
    return -logits_fake.float().mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """LDM/VQGAN's balance ||grad rec|| / (||grad g|| + 1e-4) at the decoder's last layer, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------------
# Image quality
# --------------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [B] in dB (inf if identical); default range: [-1, 1] images."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(
    size: int, sigma: float, channels: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size)  # [C, 1, k, k], depthwise


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: Literal["valid", "reflect"] = "valid",
) -> torch.Tensor:
    """Structural similarity per image [B] (Wang et al. 2004, eq. 13) with an 11x11 gaussian window.

    "valid": local statistics only where the window fits (Wang's MATLAB code, skimage); "reflect": every
    pixel, reflect-padding the border (torchmetrics >= 1.0). Averaged over positions and channels.
    """
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the {window_size}px SSIM window")
    x, y = x.double(), y.double()
    if padding == "reflect":
        pad = (window_size - 1) // 2
        x, y = F.pad(x, (pad,) * 4, mode="reflect"), F.pad(y, (pad,) * 4, mode="reflect")
    elif padding != "valid":
        raise ValueError(f"unknown SSIM padding {padding!r}; valid: 'valid', 'reflect'")
    window = _gaussian_window(window_size, sigma, x.shape[1], x.dtype, x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp(min=0)  # rounding can make E[x^2] - E[x]^2 slightly negative
    var_y = (blur(y * y) - mu_y**2).clamp(min=0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def mean_finite(values: torch.Tensor, cap: float = math.inf) -> float:
    """Mean of per-image values with +inf (identical images) replaced by `cap`."""
    return float(values.clamp(max=cap).mean())
