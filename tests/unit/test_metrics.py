"""Sanity properties of the metrics and the feature-extractor plumbing (no reference libraries)."""

import numpy as np
import pytest
import torch

from latentforge.evaluation import metrics
from latentforge.evaluation.features import (
    ClipImageExtractor,
    FeatureExtractor,
    InceptionExtractor,
    RandomProjectionExtractor,
    extract_features,
)
from latentforge.evaluation.inception import FIDInceptionV3


def _gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


def test_fid_of_identical_sets_is_zero() -> None:
    x = _gaussian(300, 32, 0)
    assert abs(metrics.fid(x, x)) < 1e-9
    assert abs(metrics.fid(x, x[::-1])) < 1e-9  # order does not matter


def test_fid_of_identical_rank_deficient_sets_is_zero() -> None:
    x = _gaussian(10, 64, 0)
    with pytest.warns(UserWarning, match="at least 64 samples"):
        assert abs(metrics.fid(x, x)) < 1e-9


def test_fid_grows_with_noise_strength() -> None:
    real = _gaussian(400, 16, 0)
    noise = _gaussian(400, 16, 1)
    values = [metrics.fid(real, real + strength * noise) for strength in (0.0, 0.1, 0.3, 0.6, 1.0, 2.0)]
    assert values[0] == pytest.approx(0, abs=1e-9)
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


def test_fid_of_known_gaussians() -> None:
    # N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d.
    d = 8
    mean_shift = np.arange(d, dtype=np.float64)
    assert metrics.fid_from_stats(np.zeros(d), np.eye(d), mean_shift, 4 * np.eye(d)) == pytest.approx(
        mean_shift @ mean_shift + d, rel=1e-12
    )


def test_fid_accepts_torch_and_checks_shapes() -> None:
    x = torch.randn(50, 4, dtype=torch.float64)
    assert metrics.fid(x, x.numpy()) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.fid(x[:1], x)
    with pytest.raises(ValueError, match="mismatched"):
        metrics.fid(x, x[:, :3])
    with pytest.raises(ValueError, match="2 dimensions"):
        metrics.fid(x[0], x)


def test_kid_zero_for_same_distribution_and_positive_for_shift() -> None:
    a, b = _gaussian(200, 16, 0), _gaussian(200, 16, 1)
    same, _ = metrics.kid(a, b, subsets=20, subset_size=100)
    shifted, _ = metrics.kid(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 * shifted
    assert shifted > 0
    assert metrics.kid(a, b, subsets=5, subset_size=50, seed=3) == metrics.kid(
        a, b, subsets=5, subset_size=50, seed=3
    )


def test_kid_rejects_too_few_samples() -> None:
    a = _gaussian(30, 4, 0)
    with pytest.raises(ValueError, match="subset_size<=30"):
        metrics.kid(a, a, subset_size=1000)


def test_inception_score_bounds() -> None:
    n, classes = 200, 10
    confident_diverse = np.full((n, classes), -30.0)
    confident_diverse[np.arange(n), np.arange(n) % classes] = 30.0
    # unshuffled, each split holds every class equally often: IS reaches its maximum, the class count
    score, std = metrics.inception_score(confident_diverse, splits=2, shuffle=False)
    assert score == pytest.approx(classes, rel=1e-6)
    assert std == pytest.approx(0, abs=1e-6)
    shuffled, _ = metrics.inception_score(confident_diverse, splits=2)
    assert 1 < shuffled < classes
    uniform, _ = metrics.inception_score(np.zeros((n, classes)), splits=4)
    assert uniform == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, classes)), splits=10)


def test_precision_falls_when_half_the_samples_are_noise() -> None:
    real, fake = _gaussian(300, 8, 0), _gaussian(300, 8, 1)
    precision, recall = metrics.precision_recall(real, fake)
    broken = fake.copy()
    broken[::2] = 10 + 5 * _gaussian(150, 8, 2)  # far off the real manifold
    broken_precision, _ = metrics.precision_recall(real, broken)
    assert precision > 0.85 and recall > 0.85
    assert broken_precision < 0.6 * precision


def test_recall_falls_when_generated_set_collapses() -> None:
    real, fake = _gaussian(300, 8, 0), _gaussian(300, 8, 1)
    _, recall = metrics.precision_recall(real, fake)
    collapsed = np.repeat(fake[:5], 60, axis=0)  # mode collapse onto 5 points
    collapsed_precision, collapsed_recall = metrics.precision_recall(real, collapsed)
    assert collapsed_recall < 0.2 * recall
    assert collapsed_precision > 0.5  # the few modes are still realistic


def test_precision_recall_batching_is_invisible() -> None:
    real, fake = _gaussian(100, 6, 0), _gaussian(90, 6, 1) + 0.5
    assert metrics.precision_recall(real, fake, batch_size=7) == metrics.precision_recall(real, fake)
    with pytest.raises(ValueError, match="more than k samples"):
        metrics.precision_recall(real[:3], fake, k=3)


def test_clip_score() -> None:
    image = torch.randn(6, 16)
    assert metrics.clip_score(image, 3 * image) == pytest.approx(100)
    assert metrics.clip_score(image, -image) == 0.0  # clipped at zero
    with pytest.raises(ValueError, match="paired"):
        metrics.clip_score(image, image[:5])


def test_random_projection_extractor_and_batching() -> None:
    extractor = RandomProjectionExtractor(dim=12, pool=4, seed=3)
    assert isinstance(extractor, FeatureExtractor)
    images = torch.randint(0, 256, (7, 3, 20, 24), dtype=torch.uint8)
    # singles and batches mixed, regrouped into batches of 3
    stream = [images[0], images[1:4], images[4], images[5:]]
    features = extract_features(extractor, stream, batch_size=3, progress=False)
    assert features.shape == (7, 12) and features.dtype == np.float32
    np.testing.assert_allclose(features, extractor(images).numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(features, RandomProjectionExtractor(dim=12, pool=4, seed=4)(images).numpy())


def test_extract_features_handles_mixed_sizes_and_empty_input() -> None:
    extractor = RandomProjectionExtractor(dim=5, pool=2)
    small = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    large = torch.randint(0, 256, (3, 3, 16, 12), dtype=torch.uint8)
    features = extract_features(extractor, [small, large], batch_size=4, progress=False)
    expected = torch.cat([extractor(small), extractor(large)]).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        extract_features(extractor, [], batch_size=4, progress=False)


def test_clip_adapter_normalises() -> None:
    weight = torch.randn(3 * 4 * 4, 10)
    extractor = ClipImageExtractor(
        encoder=lambda x: x.flatten(1) @ weight,
        preprocess=lambda images: torch.nn.functional.interpolate(images.float() / 255, size=4),
        name="stub-clip",
        preprocess_id="stub",
    )
    assert isinstance(extractor, FeatureExtractor)
    features = extract_features(extractor, [torch.randint(0, 256, (5, 3, 9, 9), dtype=torch.uint8)], 2, False)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)


def test_inception_extractor_outputs() -> None:
    model = FIDInceptionV3().eval()
    images = torch.randint(0, 256, (1, 3, 75, 75), dtype=torch.uint8)
    pool3 = InceptionExtractor(model, "pool3")
    logits = InceptionExtractor(model, "logits_unbiased")
    assert pool3(images).shape == (1, 2048) and logits(images).shape == (1, 1008)
    assert pool3.name != logits.name and pool3.preprocess_id == logits.preprocess_id
    with pytest.raises(ValueError, match="pool3"):
        InceptionExtractor(model, "pool4")
