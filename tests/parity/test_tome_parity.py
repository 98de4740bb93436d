"""ToMe for SD: our merge plan against tomesd's `bipartite_soft_matching_random2d` (same merges, bit for bit),
a tiny U-Net with ToMe against diffusers' with `tomesd.apply_patch` (same random weights, fp32), ratio 0
and undo being the plain model bit for bit."""

from __future__ import annotations

import pytest
import tomesd
import torch
from diffusers import UNet2DConditionModel
from tomesd.merge import bipartite_soft_matching_random2d

from latentforge.checkpoints.keymap_unet import diffusers_config, ours_to_diffusers
from latentforge.models.attention import TokenMerging, bipartite_merge
from latentforge.models.configs import UNetConfig
from latentforge.models.token_merging import apply_token_merging
from latentforge.models.unet import UNetModel

# attention at the full latent resolution (level 0) and at /2, where max_downsample decides
CONFIG = UNetConfig(channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2, context_dim=32)


@pytest.mark.parametrize("size", [(8, 8), (7, 10), (5, 5)], ids=["square", "odd", "tiny"])
@pytest.mark.parametrize("use_rand", [False, True])
def test_same_merges_as_tomesd(size, use_rand):
    h, w = size
    metric = torch.randn(4, h * w, 16)
    x = torch.randn(4, h * w, 24)
    r = int(h * w * 0.5)
    seeds = [torch.Generator().manual_seed(3) for _ in range(2)] if use_rand else [None, None]
    ours = bipartite_merge(metric, w, h, 2, 2, r, seeds[0])
    theirs = bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, no_rand=not use_rand, generator=seeds[1])
    merged = ours[0](x)
    assert merged.shape[1] < h * w
    assert torch.equal(merged, theirs[0](x))
    assert torch.equal(ours[1](merged), theirs[1](merged))


def _pair() -> tuple[UNetModel, UNet2DConditionModel]:
    torch.manual_seed(0)
    ours = UNetModel(CONFIG).eval()
    reference = UNet2DConditionModel(**diffusers_config(CONFIG)).eval()
    reference.load_state_dict(ours_to_diffusers(ours.state_dict(), CONFIG), strict=True)
    return ours, reference


@pytest.mark.parametrize("max_downsample", [1, 2])
@pytest.mark.parametrize("use_rand", [False, True])
def test_unet_with_tome_matches_tomesd_on_diffusers(max_downsample, use_rand):
    ours, reference = _pair()
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([999.0, 300.0]), torch.randn(2, 9, 32)
    settings = TokenMerging(ratio=0.5, max_downsample=max_downsample, use_rand=use_rand)
    tomesd.apply_patch(reference, ratio=0.5, max_downsample=max_downsample, use_rand=use_rand)
    reference._tome_info["args"]["generator"] = torch.Generator().manual_seed(11)
    with torch.no_grad():
        plain = ours(x, t, context)
        expected = reference(x, t, context).sample
        with apply_token_merging(ours, settings, torch.Generator().manual_seed(11) if use_rand else None):
            merged = ours(x, t, context)
        assert torch.equal(ours(x, t, context), plain)  # undone exactly
    tomesd.remove_patch(reference)
    error = (merged - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, error
    assert (merged - plain).abs().max() / plain.abs().max() > 1e-3  # ToMe changed something


def test_ratio_zero_is_the_plain_model_bit_for_bit():
    ours, _ = _pair()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 300.0]), torch.randn(2, 9, 32)
    with torch.no_grad():
        plain = ours(x, t, context)
        with apply_token_merging(ours, TokenMerging(ratio=0.0, max_downsample=8)):
            assert torch.equal(ours(x, t, context), plain)
    with pytest.raises(ValueError, match="ratio"):
        apply_token_merging(ours, TokenMerging(ratio=1.0))
