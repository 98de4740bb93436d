"""Is model B's CLIP score really lower than A's? A paired comparison of two folders of the same generations.

    python scripts/paired_clip_score.py A_IMAGES B_IMAGES --clip CLIP_FILE [--clip CLIP2] [--resamples N]

A_IMAGES and B_IMAGES are `latentforge eval`-style folders (NAME.png beside NAME.txt holding its caption), for
example two runs of `scripts/default_model_card.py` (`OUT/comparison/ours/holdout_prompts/images`): the same
file names must hold the same caption and seed. For each CLIP it prints both CLIP scores (100 x mean cosine,
as `latentforge eval`) and the mean per-image difference B - A with a 95% interval from a bootstrap over
captions (all seeds of a caption are resampled together, since they share the caption's difficulty).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.checkpoints.exports import load_clip
from latentforge.evaluation.clip_features import clip_image_extractor, encode_captions


def read_folder(folder: Path) -> tuple[list[str], torch.Tensor, list[str]]:
    names = sorted(p.stem for p in folder.glob("*.png"))
    if not names:
        raise SystemExit(f"{folder}: no PNG images")
    images = [np.asarray(Image.open(folder / f"{n}.png").convert("RGB")) for n in names]
    captions = [(folder / f"{n}.txt").read_text().strip() for n in names]
    return names, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def per_image_scores(clip_file: Path, images: torch.Tensor, captions: list[str]) -> np.ndarray:
    model = load_clip(clip_file).float()
    extractor = clip_image_extractor(model)
    with torch.inference_mode():
        image = torch.cat([extractor(chunk) for chunk in images.split(64)]).float().numpy()
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    return 100 * (image * encode_captions(model, captions)).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--clip", type=Path, action="append", required=True, help="CLIP file (repeatable)")
    p.add_argument("--resamples", type=int, default=10000)
    args = p.parse_args(argv)
    names_a, images_a, captions_a = read_folder(args.a)
    names_b, images_b, captions_b = read_folder(args.b)
    if names_a != names_b or captions_a != captions_b:
        raise SystemExit(f"{args.a} and {args.b} do not hold the same file names and captions")
    groups = {c: i for i, c in enumerate(dict.fromkeys(captions_a))}
    group = np.array([groups[c] for c in captions_a])
    rng = np.random.default_rng(0)
    for clip_file in args.clip:
        a = per_image_scores(clip_file, images_a, captions_a)
        b = per_image_scores(clip_file, images_b, captions_b)
        diff = b - a
        sums, counts = np.bincount(group, diff), np.bincount(group)
        draws = rng.integers(0, len(counts), size=(args.resamples, len(counts)))
        boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
        low, high = np.percentile(boot, [2.5, 97.5])
        print(
            f"{clip_file}: A {a.mean():.2f}, B {b.mean():.2f}, B - A {diff.mean():+.3f} "
            f"(95% interval {low:+.3f} .. {high:+.3f}; {len(counts)} captions, {len(diff)} images; "
            f"B higher on {(diff > 0).mean():.1%} of images)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
