"""What a CLIP gets right when it retrieves held-out emoji: `python scripts/clip_holdout_tags.py CLIP DATA`.

For each caption of a split (every emoji caption is unique), ranks that split's images by our CLIP and
reports text->image top-1/top-5 (as `latentforge train clip` does) and how often the top-1 image shares
the caption's subcategory, style and skin tone. Also the ceiling of a model that knows those three tags
perfectly but nothing of names: the expected top-5 when the images of the right group come first in random
order, i.e. what subcategory recognition alone could reach on unseen emoji. And the image tower's zero-shot
subcategory classification: each image against its own caption with the name left out and the
subcategory replaced by each of the dataset's (the name-less form "<skin tone>, <subcategory>, <style>
style" the caption variants train on), so that names, unseen in a held-out caption, play no part.
`--free-form N` adds free-form retrieval: N "<name>, <style> style" prompts of training emoji
(`free_form_captions`, drawn at random), each looking for its emoji (any skin tone) among the 5 nearest of
all training images: does the text tower understand the prompts people type?
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentforge.data.emoji import free_form_captions
from latentforge.evaluation.extractors import load_clip_extractor

TAGS = ("subcategory", "style", "skin_tone")


def read_records(data: Path) -> list[dict]:
    """The dataset's `metadata.jsonl` records, every split."""
    return [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line]


def load_pixels(data: Path, records: list[dict]) -> torch.Tensor:
    """[N, 3, H, W] uint8 images of the records."""
    return torch.stack(
        [
            torch.from_numpy(np.array(Image.open(data / r["file_name"]).convert("RGB"))).permute(2, 0, 1)
            for r in records
        ]
    )


def image_features(extractor: Any, pixels: torch.Tensor) -> torch.Tensor:
    """[N, D] CLIP image features of [N, 3, H, W] uint8 images."""
    with torch.inference_mode():
        return torch.cat([extractor.image(chunk) for chunk in pixels.split(64)]).float()


def free_form_report(clip: str, data: Path, prompts: int = 600, seed: int = 0) -> dict[str, float]:
    """Free-form "<name>, <style> style" prompts of training emoji against all training images."""
    train = [r for r in read_records(data) if r["split"] == "train"]
    pairs = [(c, r["base_unified"]) for r in train for c in free_form_captions(r) if c.endswith(" style")]
    pick = np.random.default_rng(seed).choice(len(pairs), min(prompts, len(pairs)), replace=False)
    captions, owners = [pairs[i][0] for i in pick], [pairs[i][1] for i in pick]
    extractor = load_clip_extractor(clip)
    images = image_features(extractor, load_pixels(data, train))
    texts = torch.from_numpy(extractor.encode_text(captions)).float()
    top = (texts @ images.T).topk(min(5, len(train)), dim=1).indices
    hits = [
        [train[int(j)]["base_unified"] == owner for j in row] for row, owner in zip(top, owners, strict=True)
    ]
    return {
        "free_form_prompts": float(len(captions)),
        "free_form_top1": float(np.mean([h[0] for h in hits])),
        "free_form_top5": float(np.mean([any(h) for h in hits])),
    }


def subcategory_prompts(record: dict, subcategories: list[str]) -> list[str]:
    """The record's caption without its name (the first tag), with each of `subcategories` in turn."""
    tags = [t.strip() for t in record["caption"].split(",")][1:]
    at = tags.index(record["subcategory"])
    return [", ".join(tags[:at] + [s] + tags[at + 1 :]) for s in subcategories]


def tag_report(clip: str, data: Path, split: str = "holdout", limit: int = 290) -> dict[str, float]:
    all_records = read_records(data)
    records = [r for r in all_records if r["split"] == split]
    records = records[:: max(1, len(records) // limit)][:limit]  # evenly spread when the split is larger
    extractor = load_clip_extractor(clip)
    images = image_features(extractor, load_pixels(data, records))
    texts = torch.from_numpy(extractor.encode_text([r["caption"] for r in records])).float()
    top5 = (texts @ images.T).topk(5, dim=1).indices  # [caption, 5]; caption i describes image i
    n, truth = len(records), torch.arange(len(records))
    report = {
        "images": float(n),
        "t2i_top1": (top5[:, 0] == truth).float().mean().item(),
        "t2i_top5": (top5 == truth[:, None]).any(1).float().mean().item(),
    }
    for tag in TAGS:
        report[f"top1_same_{tag}"] = float(
            np.mean([records[i][tag] == records[int(top5[i, 0])][tag] for i in range(n)])
        )
    subcategories = sorted({r["subcategory"] for r in all_records})
    truth_index = torch.tensor([subcategories.index(r["subcategory"]) for r in records])
    scores = []
    for record, image in zip(records, images, strict=True):
        prompts = subcategory_prompts(record, subcategories)
        scores.append(torch.from_numpy(extractor.encode_text(prompts)).float() @ image)
    ranked = torch.stack(scores).topk(min(5, len(subcategories)), dim=1).indices  # [image, 5]
    report["zero_shot_subcategory_top1"] = (ranked[:, 0] == truth_index).float().mean().item()
    report["zero_shot_subcategory_top5"] = (ranked == truth_index[:, None]).any(1).float().mean().item()
    group = Counter(tuple(r[t] for t in TAGS) for r in records)
    sizes = [group[tuple(r[t] for t in TAGS)] for r in records]
    report["tags_only_ceiling_top1"] = float(np.mean([1 / s for s in sizes]))
    report["tags_only_ceiling_top5"] = float(
        np.mean([1 - comb(s - 1, 5) / comb(s, 5) if s > 5 else 1 for s in sizes])
    )
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clip", help="a `latentforge train clip` export")
    p.add_argument("data", type=Path, help="the emoji dataset folder (metadata.jsonl)")
    p.add_argument("--split", default="holdout")
    p.add_argument("--limit", type=int, default=290, help="images (evenly spread over the split)")
    p.add_argument("--free-form", type=int, default=0, metavar="N", help="also N free-form prompts")
    args = p.parse_args(argv)
    report = tag_report(args.clip, args.data, args.split, args.limit)
    if args.free_form:
        report |= free_form_report(args.clip, args.data, args.free_form)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
