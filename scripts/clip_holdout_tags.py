"""What a CLIP gets right when it retrieves held-out emoji: `python scripts/clip_holdout_tags.py CLIP DATA`.

For each caption of a split (every emoji caption is unique), ranks that split's images by our CLIP and
reports text->image top-1/top-5 (as `latentforge train clip` does) and how often the top-1 image shares
the caption's subcategory, style and skin tone. Also the ceiling of a model that knows those three tags
perfectly but nothing of names: the expected top-5 when the images of the right group come first in random
order, i.e. what subcategory recognition alone could reach on unseen emoji.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from math import comb
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.evaluation.extractors import load_clip_extractor

TAGS = ("subcategory", "style", "skin_tone")


def tag_report(clip: str, data: Path, split: str = "holdout", limit: int = 290) -> dict[str, float]:
    records = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line]
    records = [r for r in records if r["split"] == split]
    records = records[:: max(1, len(records) // limit)][:limit]  # evenly spread when the split is larger
    extractor = load_clip_extractor(clip)
    pixels = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(data / r["file_name"]).convert("RGB"))).permute(2, 0, 1)
            for r in records
        ]
    )  # [N, 3, H, W] uint8
    with torch.inference_mode():
        images = torch.cat([extractor.image(chunk) for chunk in pixels.split(64)]).float()
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
    args = p.parse_args(argv)
    print(json.dumps(tag_report(args.clip, args.data, args.split, args.limit), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
