"""Metrics against torch-fidelity, clean-fid, pytorch-fid and torchmetrics on identical feature arrays."""

import importlib
from types import SimpleNamespace

import cleanfid.fid as cleanfid_fid
import numpy as np
import pytest
import pytorch_fid.fid_score as pytorch_fid_score
import torch
import torch_fidelity.metric_fid as tf_fid
import torch_fidelity.metric_isc as tf_isc
import torch_fidelity.metric_kid as tf_kid
import torch_fidelity.metric_prc as tf_prc

from latentforge.evaluation import metrics


def _feature_sets(n_a: int, n_b: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated, shifted Gaussian feature sets (well-conditioned when n > dim)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / dim**0.5
    a = rng.normal(size=(n_a, dim)) @ mix + 0.2
    b = rng.normal(size=(n_b, dim)) @ (mix + 0.3 * np.eye(dim)) - 0.1
    return a, b


@pytest.mark.parametrize(("n_a", "n_b", "dim"), [(500, 400, 32), (600, 700, 128)])
def test_fid_matches_three_references(n_a: int, n_b: int, dim: int) -> None:
    a, b = _feature_sets(n_a, n_b, dim)
    ours = metrics.fid(a, b)
    mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
    references = {
        "pytorch-fid": pytorch_fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2),
        "clean-fid": cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2),
        "torch-fidelity": tf_fid.fid_statistics_to_metric(
            tf_fid.fid_features_to_statistics(torch.from_numpy(a)),
            tf_fid.fid_features_to_statistics(torch.from_numpy(b)),
            verbose=False,
        )[tf_fid.KEY_METRIC_FID],
    }
    for name, value in references.items():
        assert ours == pytest.approx(value, rel=1e-6), name
    assert metrics.fid_from_stats(mu1, sigma1, mu2, sigma2) == pytest.approx(ours, rel=1e-12)


def test_fid_rank_deficient_is_finite_and_close_to_reference() -> None:
    a, b = _feature_sets(40, 30, 64, seed=1)
    with pytest.warns(UserWarning, match="rank-deficient"):
        ours = metrics.fid(a, b)
    reference = pytorch_fid_score.calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert np.isfinite(ours)
    # sqrtm of a singular product is ill-conditioned in the reference; agreement is to its accuracy
    assert ours == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize(
    ("subsets", "subset_size", "degree", "gamma", "coef0"), [(20, 50, 3, None, 1), (7, 80, 2, 0.05, 0.5)]
)
def test_kid_matches_torch_fidelity(
    subsets: int, subset_size: int, degree: int, gamma: float | None, coef0: float
) -> None:
    # Same subsets: both draw from np.random.RandomState(seed), input1 indices then input2 per subset.
    a, b = _feature_sets(120, 100, 16)
    ours = metrics.kid(a, b, subsets, subset_size, degree, gamma, coef0, seed=2020)
    reference = tf_kid.kid_features_to_metric(
        torch.from_numpy(a),
        torch.from_numpy(b),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        kid_kernel_poly_degree=degree,
        kid_kernel_poly_gamma=gamma,
        kid_kernel_poly_coef0=coef0,
        rng_seed=2020,
        verbose=False,
    )
    assert ours[0] == pytest.approx(reference[tf_kid.KEY_METRIC_KID_MEAN], rel=1e-9)
    assert ours[1] == pytest.approx(reference[tf_kid.KEY_METRIC_KID_STD], rel=1e-9)


def test_kid_mean_matches_clean_fid() -> None:
    # clean-fid draws from the global legacy RNG, the second argument's subset first; MMD^2 is symmetric,
    # so kernel_distance(a, b) after np.random.seed(s) sees our kid(b, a, seed=s) subsets.
    a, b = _feature_sets(90, 110, 16, seed=3)
    np.random.seed(5)
    reference = cleanfid_fid.kernel_distance(a, b, num_subsets=10, max_subset_size=60)
    ours, _ = metrics.kid(b, a, subsets=10, subset_size=60, seed=5)
    assert ours == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize(("n", "splits", "shuffle"), [(103, 10, True), (50, 3, False), (20, 1, True)])
def test_inception_score_matches_torch_fidelity(n: int, splits: int, shuffle: bool) -> None:
    logits = torch.randn(n, 1008, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 3
    ours = metrics.inception_score(logits.numpy(), splits, shuffle=shuffle, seed=2020)
    reference = tf_isc.isc_features_to_metric(logits, splits, shuffle=shuffle, rng_seed=2020)
    assert ours[0] == pytest.approx(reference[tf_isc.KEY_METRIC_ISC_MEAN], rel=1e-10)
    assert ours[1] == pytest.approx(reference[tf_isc.KEY_METRIC_ISC_STD], rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_torch_fidelity(k: int) -> None:
    real, fake = _feature_sets(300, 230, 12, seed=k)
    fake = fake + 0.8  # partial overlap: neither metric saturates
    precision, recall = metrics.precision_recall(real, fake, k=k, batch_size=64)
    # torch-fidelity's convention: features_1 is generated, features_2 is real.
    ref_full = tf_prc.calculate_precision_recall_full(
        torch.from_numpy(fake), torch.from_numpy(real), k, 10000
    )
    ref_part = tf_prc.calculate_precision_recall_part(torch.from_numpy(fake), torch.from_numpy(real), k, 50)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95
    # torch-fidelity averages in float32; 1e-6 is far below one sample's share (1/300), so counts agree
    assert (precision, recall) == pytest.approx(ref_full, abs=1e-6)
    assert (precision, recall) == pytest.approx(ref_part, abs=1e-6)


def test_precision_recall_matches_paper_formula() -> None:
    """Reference written from Kynkaanniemi et al. 2019, eq. 1-3, with plain loops (independent of ours)."""
    real, fake = _feature_sets(60, 50, 5, seed=9)
    k = 3

    def radius(x: np.ndarray, i: int) -> float:
        return sorted(np.linalg.norm(x - x[i], axis=1))[k]  # index 0 is the point itself

    def inside(phi: np.ndarray, centres: np.ndarray) -> bool:
        return any(np.linalg.norm(phi - c) <= radius(centres, j) for j, c in enumerate(centres))

    precision = np.mean([inside(f, real) for f in fake])
    recall = np.mean([inside(r, fake) for r in real])
    assert metrics.precision_recall(real, fake, k=k) == pytest.approx((precision, recall), abs=1e-12)


def test_clip_score_matches_torchmetrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drive torchmetrics' clip_score with a stub CLIP whose embeddings are given arrays."""
    module = importlib.import_module("torchmetrics.functional.multimodal.clip_score")
    gen = torch.Generator().manual_seed(0)
    n, dim = 12, 32
    image_embeds = torch.randn(n, dim, generator=gen)
    text_embeds = 0.5 * image_embeds + torch.randn(n, dim, generator=gen)

    class StubProcessor:
        def __call__(self, images=None, text=None, **kwargs):
            if images is not None:
                return {"pixel_values": torch.stack(images).flatten(1)}
            ids = torch.tensor([[int(t)] for t in text])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class StubModel:
        config = SimpleNamespace()

        def to(self, device):
            return self

        def get_image_features(self, pixel_values):
            return pixel_values

        def get_text_features(self, input_ids, attention_mask):
            return current_text[input_ids[:, 0]]

    monkeypatch.setattr(module, "_get_clip_model_and_processor", lambda name: (StubModel(), StubProcessor()))
    texts = [str(i) for i in range(n)]
    for current_text in (text_embeds, -text_embeds, text_embeds * (torch.arange(n) % 3 - 0.8)[:, None]):
        reference = module.clip_score(image_embeds[:, None, None, :], texts, "stub").item()
        ours = metrics.clip_score(image_embeds, current_text)
        assert ours == pytest.approx(reference, rel=1e-5, abs=1e-5)
