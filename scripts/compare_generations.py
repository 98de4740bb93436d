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
import torch
from PIL import Image

from latentforge.checkpoints.exports import load_clip
from latentforge.evaluation.clip_features import clip_image_extractor, encode_captions
from latentforge.evaluation.metrics import fid


def read_folder(folder: Path, captions: bool = True) -> tuple[list[str], torch.Tensor, list[str]]:
    paths = sorted(folder.rglob("*.png"))
    if not paths:
        raise SystemExit(f"{folder}: no PNG images")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    texts = [p.with_suffix(".txt").read_text().strip() for p in paths] if captions else []
    names = [str(p.relative_to(folder)) for p in paths]
    return names, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), texts


def image_embeddings(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    extractor = clip_image_extractor(model)  # L2-normalised, the features of FID-CLIP
    with torch.inference_mode():
        return torch.cat([extractor(chunk) for chunk in images.split(64)]).double().numpy()


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
    names_a, images_a, captions = read_folder(args.a)
    names_b, images_b, captions_b = read_folder(args.b)
    if names_a != names_b or captions != captions_b:
        raise SystemExit(f"{args.a} and {args.b} do not hold the same file names and captions")
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    groups = np.array([index[c] for c in captions])
    reference = read_folder(args.reference, captions=False)[1] if args.reference else None
    print(f"{len(index)} captions, {len(captions)} images per folder; B - A with 95% intervals")
    for clip_file in args.clip:
        rng = np.random.default_rng(0)
        model = load_clip(clip_file).float()
        a, b = image_embeddings(model, images_a), image_embeddings(model, images_b)
        text = encode_captions(model, captions).astype(np.float64)
        score_a, score_b = 100 * (a * text).sum(axis=1), 100 * (b * text).sum(axis=1)
        diff = score_b - score_a
        low, high = paired_interval(partial(_mean_at, diff), groups, args.resamples, rng)
        print(
            f"{clip_file}\n  CLIP score: A {score_a.mean():.2f}, B {score_b.mean():.2f}, "
            f"B - A {diff.mean():+.3f} ({low:+.3f} .. {high:+.3f}); "
            f"B higher on {(diff > 0).mean():.1%} of images"
        )
        if reference is not None:
            real = image_embeddings(model, reference)
            fid_a, fid_b = fid(real, a), fid(real, b)
            low, high = paired_interval(partial(_fid_difference, real, a, b), groups, args.resamples, rng)
            print(
                f"  FID-CLIP: A {fid_a:.4f}, B {fid_b:.4f}, "
                f"B - A {fid_b - fid_a:+.4f} ({low:+.4f} .. {high:+.4f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
