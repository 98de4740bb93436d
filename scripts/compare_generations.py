"""Is model B really better or worse than A? A paired comparison of two folders of the same generations.

    python scripts/compare_generations.py A_IMAGES B_IMAGES --clip CLIP [--clip CLIP2] [--reference DIR]

A_IMAGES and B_IMAGES are `latentforge eval`-style folders (NAME.png beside NAME.txt holding its caption), for
example two runs of `scripts/default_model_card.py` (`OUT/comparison/ours/holdout_prompts/images`): the same
file names must hold the same caption and seed. For each CLIP it prints both models' CLIP score (100 x mean
cosine, as `latentforge eval`) and, with `--reference` (the real images, e.g. DATA/holdout), their FID on
that CLIP's image embeddings (FID-CLIP, as `latentforge eval --features clip:CLIP`), each with the paired
difference B - A and its 95% interval from a bootstrap over captions: a resample draws captions with
replacement and takes all seeds of each drawn caption from both folders, since they share its difficulty.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from latentforge.evaluation.evaluate import FeatureSet, compute_features
from latentforge.evaluation.extractors import EvalExtractor, load_clip_extractor
from latentforge.evaluation.metrics import fid


def features(folder: Path, extractor: EvalExtractor, label: str) -> FeatureSet:
    """`latentforge eval`'s features of every image below `folder`, all of which must be readable."""
    found = compute_features(folder, extractor, label=label, progress=False)
    if found.features is None or found.images.skipped:
        raise SystemExit(f"{folder}: unreadable or no images {found.images.skipped[:3]}")
    return found


def names_and_captions(found: FeatureSet) -> tuple[list[str], list[str | None]]:
    root = found.images.root
    assert root is not None  # a folder set
    names = [str(found.images.paths[i].relative_to(root)) for i in found.indices]
    return names, found.images.captions(found.indices)


def _mean_at(values: np.ndarray, rows: np.ndarray) -> float:
    return float(values[rows].mean())


def _fid_difference(real: np.ndarray, a: np.ndarray, b: np.ndarray, rows: np.ndarray) -> float:
    return fid(real, b[rows]) - fid(real, a[rows])


def paired_interval(
    statistic: Callable[[np.ndarray], float], groups: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95% interval of statistic(rows) over resamples of whole groups (rows of the drawn groups)."""
    members = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    draws = rng.integers(0, len(members), size=(resamples, len(members)))
    values = [statistic(np.concatenate([members[g] for g in draw])) for draw in draws]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--clip", type=Path, action="append", required=True, help="CLIP file (repeatable)")
    p.add_argument("--reference", type=Path, help="real images for FID-CLIP (searched recursively)")
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args(argv)
    for number, clip_file in enumerate(args.clip):
        rng = np.random.default_rng(0)
        extractor = load_clip_extractor(clip_file)
        assert extractor.encode_text is not None  # a CLIP extractor has its text tower
        a, b = features(args.a, extractor, "A"), features(args.b, extractor, "B")
        names, captions = names_and_captions(a)
        if (names, captions) != names_and_captions(b) or None in captions:
            raise SystemExit(f"{args.a} and {args.b} do not hold the same file names and captions")
        texts = [str(c) for c in captions]
        index = {c: i for i, c in enumerate(dict.fromkeys(texts))}
        groups = np.array([index[c] for c in texts])
        if number == 0:
            print(f"{len(index)} captions, {len(texts)} images per folder; B - A with 95% intervals")
        text = extractor.encode_text(texts).astype(np.float64)
        score_a, score_b = 100 * (a.features * text).sum(axis=1), 100 * (b.features * text).sum(axis=1)
        diff = score_b - score_a
        low, high = paired_interval(partial(_mean_at, diff), groups, args.resamples, rng)
        print(
            f"{clip_file}\n  CLIP score: A {score_a.mean():.2f}, B {score_b.mean():.2f}, "
            f"B - A {diff.mean():+.3f} ({low:+.3f} .. {high:+.3f}); "
            f"B higher on {(diff > 0).mean():.1%} of images"
        )
        if args.reference is not None:
            real = features(args.reference, extractor, "reference").features
            fid_a, fid_b = fid(real, a.features), fid(real, b.features)
            statistic = partial(_fid_difference, real, a.features, b.features)
            low, high = paired_interval(statistic, groups, args.resamples, rng)
            print(
                f"  FID-CLIP: A {fid_a:.4f}, B {fid_b:.4f}, "
                f"B - A {fid_b - fid_a:+.4f} ({low:+.4f} .. {high:+.4f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
