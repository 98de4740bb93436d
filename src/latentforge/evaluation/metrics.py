"""Sample-quality metrics on feature arrays: FID, KID, Inception Score, precision/recall, CLIP score.

All metrics take features as arrays [N, D] (numpy or torch) and compute in numpy float64.
Notation: mu, sigma are a feature set's mean and covariance (ddof=1, as `np.cov`); "generated" and
"real" follow the papers. FID is Heusel et al. 2017, KID is Binkowski et al. 2018, IS is Salimans et al.
2016, precision/recall is Kynkaanniemi et al. 2019, CLIP score is Hessel et al. 2021 (torchmetrics form).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike, what: str, ndim: int = 2) -> np.ndarray:
    """Convert a numpy array or torch tensor to float64 numpy and check its rank."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {x.shape}")
    return x


def feature_statistics(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (ddof=1) of a feature set [N, D], as used by FID."""
    feats = _as_float64(feats, "features")
    n, d = feats.shape
    if n < 2:
        raise ValueError(f"FID statistics need at least 2 samples, got {n}")
    if n < d:
        warnings.warn(
            f"{n} samples for {d}-d features: the covariance is rank-deficient and FID is biased upwards; "
            f"use at least {d} samples (the usual practice is 10k-50k)",
            stacklevel=3,
        )
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _clip_null(eigvals: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are rounding noise (sqrt would amplify them)."""
    threshold = len(eigvals) * np.finfo(np.float64).eps * max(np.abs(eigvals).max(initial=0.0), 1e-300)
    return np.where(eigvals > threshold, eigvals, 0.0)


def fid_from_stats(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians.

    Tr (S1 S2)^{1/2} is computed as Tr (S1^{1/2} S2 S1^{1/2})^{1/2}: the two matrices are similar, and the
    second is symmetric PSD, so symmetric eigensolvers apply and rank-deficient covariances stay finite.
    """
    mu1, mu2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    eigvals1, eigvecs1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigvecs1 * np.sqrt(_clip_null(eigvals1))) @ eigvecs1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_covmean = np.sqrt(_clip_null(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet Inception Distance between two feature sets [N, D] (each needs N >= 2; warns when N < D)."""
    mu1, sigma1 = feature_statistics(feats_a)
    mu2, sigma2 = feature_statistics(feats_b)
    return fid_from_stats(mu1, sigma1, mu2, sigma2)


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def kid(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a polynomial kernel, averaged over random subsets.

    Subsets are drawn as torch-fidelity does (one `np.random.RandomState(seed)`, per subset first `feats_a`
    then `feats_b` indices, without replacement), so `seed=2020` reproduces its default.

    Args:
        feats_a, feats_b: feature sets [N_a, D] and [N_b, D] (torch-fidelity's input1 and input2).
        subsets: number of random subsets; subset_size: samples per subset (needs <= min(N_a, N_b)).
        degree, gamma, coef0: kernel k(x, y) = (gamma <x, y> + coef0)^degree; gamma defaults to 1 / D.
        seed: seed of the subset sampler.

    Returns:
        (mean, std) over subsets; std uses ddof=0 as torch-fidelity.
    """
    feats_a, feats_b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    n_a, n_b = len(feats_a), len(feats_b)
    if subset_size < 2 or subset_size > min(n_a, n_b):
        raise ValueError(
            f"KID subset_size={subset_size} needs 2 <= subset_size <= min(N_a, N_b); got N_a={n_a}, "
            f"N_b={n_b}: pass subset_size<={min(n_a, n_b)} or provide more samples"
        )
    if subsets < 1:
        raise ValueError(f"KID needs subsets >= 1, got {subsets}")
    gamma = 1.0 / feats_a.shape[1] if gamma is None else gamma
    m = subset_size
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = feats_a[rng.choice(n_a, m, replace=False)]
        y = feats_b[rng.choice(n_b, m, replace=False)]
        k_xx = _polynomial_kernel(x, x, degree, gamma, coef0)
        k_yy = _polynomial_kernel(y, y, degree, gamma, coef0)
        k_xy = _polynomial_kernel(x, y, degree, gamma, coef0)
        # Unbiased MMD^2 (Binkowski et al. 2018, eq. 4): within-set sums exclude the diagonal.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[i] = within - 2 * k_xy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())


def inception_score(
    logits: ArrayLike, splits: int = 10, *, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), averaged over `splits` chunks, as torch-fidelity.

    Samples are permuted by `np.random.RandomState(seed)` when `shuffle`, then chunk i is
    `[i*N//splits, (i+1)*N//splits)`; returns (mean, std) over chunks with std ddof=0. The original IS uses
    logits without the classifier bias (torch-fidelity's `logits_unbiased`).
    """
    x = _as_float64(logits, "logits")
    n = len(x)
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs at least `splits`={splits} >= 1 samples, got {n}")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # log softmax, [N, C]
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        chunk = slice(i * n // splits, (i + 1) * n // splits)
        log_q = np.log(p[chunk].mean(axis=0, keepdims=True))  # marginal p(y) of the chunk
        kl = (p[chunk] * (log_p[chunk] - log_q)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] via |a|^2 + |b|^2 - 2ab (float64)."""
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2 * (a @ b.T)
    return np.sqrt(np.clip(sq, 0, None))


def _knn_radii(feats: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Distance from each sample to its k-th nearest neighbour in the same set (self excluded)."""
    radii = []
    for start in range(0, len(feats), batch_size):
        dist = _pairwise_distances(feats[start : start + batch_size], feats)
        radii.append(np.partition(dist, k, axis=1)[:, k])  # column 0 is the sample itself
    return np.concatenate(radii)


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    """Fraction of queries within radius of at least one centre (the k-NN manifold estimate)."""
    inside = []
    for start in range(0, len(queries), batch_size):
        dist = _pairwise_distances(queries[start : start + batch_size], centres)
        inside.append((dist <= radii[None, :]).any(axis=1))
    return float(np.concatenate(inside).mean())


def precision_recall(
    real: ArrayLike, fake: ArrayLike, k: int = 3, batch_size: int = 2048
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii.

    Precision is the fraction of `fake` samples inside the real manifold (union of balls around real
    samples reaching their k-th nearest real neighbour); recall swaps the roles. Each set needs > k samples.
    Distances are computed in row blocks of `batch_size`.
    """
    real, fake = _as_float64(real, "real"), _as_float64(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision_recall with k={k} needs more than k samples per set, got real={len(real)}, "
            f"fake={len(fake)}"
        )
    precision = _fraction_inside(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


def clip_score(image_embeds: ArrayLike, text_embeds: ArrayLike) -> float:
    """CLIP score max(mean_i 100 cos(image_i, text_i), 0) as torchmetrics' `CLIPScore` (clip after mean)."""
    image = _as_float64(image_embeds, "image_embeds")
    text = _as_float64(text_embeds, "text_embeds")
    if image.shape != text.shape or len(image) == 0:
        raise ValueError(
            f"clip_score needs paired, non-empty embeddings of one shape, got {image.shape} and {text.shape}"
        )
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    return float(max(100 * (image * text).sum(axis=1).mean(), 0.0))
