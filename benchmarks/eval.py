"""Feature-extraction throughput per resize mode: our FID Inception (clean, legacy-pytorch,
legacy-tensorflow) vs torch-fidelity's (its pipeline is legacy-tensorflow), same random weights and images;
then `latentforge eval`'s whole feature path (PNG folder -> read -> resize -> network) per mode.

Also times FID (ours vs pytorch-fid's scipy sqrtm) on 2048-d features. No downloads: weights are random.
Usage: python benchmarks/eval.py --images 32 --size 256 --batch-size 16 [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from latentforge.evaluation import metrics
from latentforge.evaluation.evaluate import compute_features
from latentforge.evaluation.extractors import load_extractor
from latentforge.evaluation.inception import random_fid_inception
from latentforge.evaluation.resize import RESIZE_MODES, network_input

Run = Callable[[torch.Tensor], object]


def _seconds(run: Run, images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(CPU, wall-clock) seconds for one pass over all batches."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(0, len(images), batch_size):
        run(images[i : i + batch_size])
    return time.process_time() - cpu, time.perf_counter() - wall


def _throughputs(
    runs: dict[str, Run], images: torch.Tensor, batch_size: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall-clock) images per second of each run, after one warm-up batch each.

    Repeats are interleaved and the order rotates, so that load from other processes and allocator or
    cache state left by the previous run do not favour one side; CPU time is robust to a busy machine.
    """
    for run in runs.values():
        run(images[:batch_size])
    names = list(runs)
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name].append(_seconds(runs[name], images, batch_size))
    return {
        name: (
            len(images) / statistics.median(cpu for cpu, _ in times),
            len(images) / statistics.median(wall for _, wall in times),
        )
        for name, times in seconds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (resized to 299)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed passes per extractor")
    parser.add_argument("--fid-samples", type=int, default=0, help="also time FID on N x 2048 features")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = random_fid_inception(seed=0).to(device)
    shape = (args.images, 3, args.size, args.size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "pt_inception-2015-12-05-random.pth"
        torch.save(ours.state_dict(), weights)
        reference = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
        ).to(device)
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        images = images.to(device)

        def mode_run(mode: str) -> Run:
            return lambda batch: ours(batch, mode)

        def resize_run(mode: str) -> Run:
            return lambda batch: network_input(batch, 299, mode)

        runs: dict[str, Run] = {f"latentforge {mode}": mode_run(mode) for mode in RESIZE_MODES}
        runs["torch-fidelity"] = reference
        with torch.inference_mode():
            rates = _throughputs(runs, images, args.batch_size, args.repeats)
            resize_runs = {f"resize only {mode}": resize_run(mode) for mode in RESIZE_MODES}
            resize_rates = _throughputs(resize_runs, images, args.batch_size, args.repeats)
            # Same network and input pipeline (legacy-tensorflow): how far the features differ.
            ours_features = ours(images[:2], "legacy-tensorflow").pool3
            reference_features = reference(images[:2])[0]
        relative = (ours_features - reference_features).abs().max() / reference_features.abs().max()
        folder_rates = {}
        for mode in RESIZE_MODES:  # the eval command's path from files, one untimed warm-up batch first
            extractor = load_extractor(f"inception:{weights}", device, mode)
            compute_features(folder, extractor, batch_size=args.batch_size, progress=False)
            cpu, wall = time.process_time(), time.perf_counter()
            compute_features(folder, extractor, batch_size=args.batch_size, progress=False)
            folder_rates[mode] = (
                args.images / (time.process_time() - cpu),
                args.images / (time.perf_counter() - wall),
            )

    print(
        f"images {args.images} x {args.size}px, batch {args.batch_size}, threads {args.threads}, {device}, "
        f"median of {args.repeats} interleaved passes (tensors) / one pass (folder)"
    )
    reference_cpu = rates["torch-fidelity"][0]
    for name, (cpu, wall) in rates.items():
        print(
            f"{name:30s}: {cpu:8.2f} images/CPU-s {wall:8.2f} images/s"
            f"   (CPU ratio to torch-fidelity {cpu / reference_cpu:.2f})"
        )
    for name, (cpu, wall) in resize_rates.items():
        print(f"{name:30s}: {cpu:8.2f} images/CPU-s {wall:8.2f} images/s")
    for mode, (cpu, wall) in folder_rates.items():
        print(f"{'folder ' + mode:30s}: {cpu:8.2f} images/CPU-s {wall:8.2f} images/s")
    print(f"pool3 max relative difference, legacy-tensorflow vs torch-fidelity: {relative.item():.2e}")

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
