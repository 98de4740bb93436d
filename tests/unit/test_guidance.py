"""Classifier-free guidance wrapper: batching, per-image scales, the skip at scale 1, CFG rescale."""

import pytest
import torch

from analytic import AnalyticGaussian
from latentforge.sampling.guidance import CFGDenoiser, cfg_denoiser, concat_cond

G = AnalyticGaussian(mu=0.0, s=0.8)


class Counting:
    """The analytic denoiser with cond = {"crossattn": per-row mean}, recording every forward's batch."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond):
        self.batches.append((x.shape[0], torch.as_tensor(sigma).reshape(-1).shape[0], cond))
        return G(x, sigma, cond)


def _cond(values):
    return {"crossattn": torch.tensor(values, dtype=torch.float64)}


X = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
SIGMA = torch.tensor([1.5, 1.5, 1.5], dtype=torch.float64)


def test_scale_one_is_cond_only_with_one_forward():
    inner = Counting()
    out = cfg_denoiser(inner, _cond([9.0, 9.0, 9.0]), 1.0)(X, SIGMA, _cond([1.0, 2.0, 3.0]))
    assert torch.equal(out, G(X, SIGMA, _cond([1.0, 2.0, 3.0])))
    assert len(inner.batches) == 1 and inner.batches[0][0] == 3


def test_guidance_is_one_batched_forward_and_the_cfg_formula():
    inner = Counting()
    cond, uncond = _cond([1.0, 2.0, 3.0]), _cond([0.0, -1.0, 0.5])
    out = cfg_denoiser(inner, uncond, 7.5)(X, SIGMA, cond)
    assert len(inner.batches) == 1
    batch, sigmas, cond_in = inner.batches[0]
    assert batch == 6 and sigmas == 6
    assert cond_in["crossattn"].tolist() == [1.0, 2.0, 3.0, 0.0, -1.0, 0.5]  # cond first, then uncond
    d_c, d_u = G(X, SIGMA, cond), G(X, SIGMA, uncond)
    assert torch.allclose(out, d_u + 7.5 * (d_c - d_u), atol=1e-12)
    # guidance on x0 equals guidance on eps = (x - x0) / sigma
    eps = lambda d: (X - d) / 1.5  # noqa: E731
    assert torch.allclose((X - out) / 1.5, eps(d_u) + 7.5 * (eps(d_c) - eps(d_u)), atol=1e-12)


def test_per_image_scale_and_broadcast_uncond():
    cond, uncond = _cond([1.0, 2.0, 3.0]), _cond([0.5])  # one negative prompt for the batch
    scale = torch.tensor([1.0, 4.0, 0.0])
    out = CFGDenoiser(G, uncond, scale)(X, SIGMA, cond)
    for i, w in enumerate(scale.tolist()):
        d_c = G(X[i : i + 1], SIGMA[i : i + 1], _cond([[1.0, 2.0, 3.0][i]]))
        d_u = G(X[i : i + 1], SIGMA[i : i + 1], _cond([0.5]))
        assert torch.allclose(out[i : i + 1], d_u + w * (d_c - d_u), atol=1e-12)


def test_cfg_rescale_formula():
    def scaled(x, sigma, cond):  # cond scales the x0 estimate, so guidance changes its spread
        return G(x, sigma) * cond["crossattn"].view(-1, 1, 1, 1)

    cond, uncond = _cond([1.0, 2.0, 3.0]), _cond([0.5, 0.5, 0.5])
    plain = CFGDenoiser(scaled, uncond, 6.0)(X, SIGMA, cond)
    d_c = scaled(X, SIGMA, cond)
    std = lambda t: t.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    for phi in (0.0, 0.7, 1.0):
        out = CFGDenoiser(scaled, uncond, 6.0, rescale=phi)(X, SIGMA, cond)
        want = phi * plain * std(d_c) / std(plain) + (1 - phi) * plain
        assert torch.allclose(out, want, atol=1e-12)
    full = CFGDenoiser(scaled, uncond, 6.0, rescale=1.0)(X, SIGMA, cond)
    assert torch.allclose(std(full), std(d_c), rtol=1e-10)
    assert not torch.allclose(full, plain)
    per_image = CFGDenoiser(scaled, uncond, 6.0, rescale=torch.tensor([0.0, 1.0, 0.0]))(X, SIGMA, cond)
    assert torch.allclose(per_image[0], plain[0]) and torch.allclose(per_image[1], full[1])


def test_plain_tensor_conditioning_and_scalar_sigma():
    cond, uncond = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    out = cfg_denoiser(G, uncond, 3.0)(X, 1.5, cond)
    d_c, d_u = G(X, 1.5, cond), G(X, 1.5, uncond)
    assert torch.allclose(out, d_u + 3.0 * (d_c - d_u), atol=1e-12)


def test_validation_errors():
    with pytest.raises(ValueError, match="finite"):
        cfg_denoiser(G, None, float("nan"))
    with pytest.raises(ValueError, match="finite"):
        cfg_denoiser(G, None, torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="keys"):
        concat_cond({"crossattn": torch.zeros(1)}, {"vector": torch.zeros(1)})
    with pytest.raises(ValueError, match="pad"):
        concat_cond({"crossattn": torch.zeros(2, 77, 8)}, {"crossattn": torch.zeros(2, 154, 8)})
    assert concat_cond(None, None) is None
