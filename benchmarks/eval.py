"""Feature-extraction throughput: our FID Inception vs torch-fidelity's, same random weights and images.

Also times FID (ours vs pytorch-fid's scipy sqrtm) on 2048-d features. No downloads: weights are random.
Usage: python benchmarks/eval.py --images 64 --size 256 --batch-size 16 [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from latentforge.evaluation import metrics
from latentforge.evaluation.inception import random_fid_inception


def _throughput(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int) -> float:
    """Images per second over all batches, after one warm-up batch."""
    run(images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        run(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (resized to 299)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fid-samples", type=int, default=0, help="also time FID on N x 2048 features")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = random_fid_inception(seed=0).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        torch.save(ours.state_dict(), weights)
        reference = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
        ).to(device)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8)
    images = images.to(device)

    with torch.inference_mode():
        ours_rate = _throughput(ours, images, args.batch_size)
        reference_rate = _throughput(reference, images, args.batch_size)
        # Same network, different input pipelines (see inception.py): report how far the features differ.
        ours_features = ours(images[:2]).pool3
        reference_features = reference(images[:2])[0]
    relative = (ours_features - reference_features).abs().max() / reference_features.abs().max()
    print(f"images {args.images} x {args.size}px, batch {args.batch_size}, threads {args.threads}, {device}")
    print(f"latentforge    : {ours_rate:8.2f} images/s")
    print(f"torch-fidelity : {reference_rate:8.2f} images/s  (ratio {ours_rate / reference_rate:.2f})")
    print(f"pool3 max relative difference from the input pipelines: {relative.item():.2e}")

    if args.fid_samples:
        from pytorch_fid.fid_score import calculate_frechet_distance

        rng = np.random.default_rng(0)
        a, b = rng.normal(size=(2, args.fid_samples, 2048))
        stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b + 0.1)]
        start = time.perf_counter()
        value = metrics.fid_from_stats(*stats[0], *stats[1])
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        reference_value = calculate_frechet_distance(*stats[0], *stats[1])
        reference_seconds = time.perf_counter() - start
        print(
            f"FID 2048-d: ours {ours_seconds:.2f}s ({value:.6f}), pytorch-fid {reference_seconds:.2f}s "
            f"({reference_value:.6f})"
        )


if __name__ == "__main__":
    main()
