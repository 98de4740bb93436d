"""How well can anything trained on the emoji artwork tell an unseen emoji's subcategory?

    python scripts/subcategory_baselines.py DATA [--clip CLIP ...] [--classifier-epochs 20]

For each held-out image (emoji whose names never occur in training), the subcategory of its nearest
training image by raw pixels (16x16) and by each CLIP's image features, and the held-out top-1 / top-5 of
a small convolutional classifier trained on the training images' subcategory labels (four conv stages of
width 32-256, zoom crops and flips, AdamW with a one-cycle LR, bf16 where the CPU has it; about 80 s an
epoch on one thread). docs/default-model.md, "A new machine, CLIP v3 and a second start".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from clip_holdout_tags import image_features, load_pixels, read_records  # scripts/
from torch import nn

from latentforge.evaluation.extractors import load_clip_extractor
from latentforge.training.tasks.clip import random_zoom


def nearest_neighbour_accuracy(
    train: torch.Tensor, held_out: torch.Tensor, labels: list, truth: list
) -> float:
    """Fraction of held-out rows whose nearest training row (cosine) has their label."""
    similarity = F.normalize(held_out.float(), dim=-1) @ F.normalize(train.float(), dim=-1).T
    nearest = similarity.argmax(1)
    return float(np.mean([labels[int(j)] == t for j, t in zip(nearest, truth, strict=True)]))


def classifier(classes: int, width: int = 32) -> nn.Module:
    def stage(i: int, o: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
            nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip

    w = width
    return nn.Sequential(
        stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w), stage(4 * w, 8 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8 * w, classes),
    )  # fmt: skip


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random zoom crops (up to 1.2x, the CLIP task's `random_zoom` on the global generator) and horizontal
    flips."""
    x = random_zoom(x, 1.2, torch.default_generator)
    return torch.where((torch.rand(len(x)) < 0.5)[:, None, None, None], x.flip(-1), x)


def train_classifier(x: torch.Tensor, y: torch.Tensor, xh: torch.Tensor, yh: torch.Tensor, classes: int,
                     epochs: int) -> list[tuple[float, float]]:  # fmt: skip
    """Held-out (top-1, top-5) after each epoch."""
    torch.manual_seed(0)
    net = classifier(classes)
    steps = epochs * (len(x) // 64)
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    history, start = [], time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 63, 64):
            index = order[i : i + 64]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(augment(x[index])), y[index], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            top5 = torch.cat([net(chunk) for chunk in xh.split(128)]).topk(5, 1).indices
        net.train()
        top1_hit, top5_hit = top5[:, 0] == yh, (top5 == yh[:, None]).any(1)
        history.append((top1_hit.float().mean().item(), top5_hit.float().mean().item()))
        print(f"epoch {epoch + 1}: held-out top-1 / top-5 {history[-1][0]:.3f} / {history[-1][1]:.3f}, "
              f"{time.time() - start:.0f} s", file=sys.stderr)  # fmt: skip
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="the emoji dataset folder (metadata.jsonl)")
    p.add_argument("--clip", action="append", default=[], help="a CLIP export (repeatable)")
    p.add_argument("--classifier-epochs", type=int, default=20, help="0 = no classifier")
    args = p.parse_args(argv)
    records = read_records(args.data)
    train = [r for r in records if r["split"] == "train"]
    held_out = [r for r in records if r["split"] == "holdout"]
    subcategories = sorted({r["subcategory"] for r in records})
    labels, truth = [r["subcategory"] for r in train], [r["subcategory"] for r in held_out]
    pixels, pixels_h = load_pixels(args.data, train), load_pixels(args.data, held_out)
    report: dict = {"held_out_images": len(held_out)}

    def small(p: torch.Tensor) -> torch.Tensor:
        return F.interpolate(p.float(), size=16, mode="area").flatten(1) - 127.5

    report["nearest_by_pixels_16"] = nearest_neighbour_accuracy(small(pixels), small(pixels_h), labels, truth)
    for clip in args.clip:
        extractor = load_clip_extractor(clip)
        features = [image_features(extractor, p) for p in (pixels, pixels_h)]
        report[f"nearest_by_clip {clip}"] = nearest_neighbour_accuracy(*features, labels, truth)
    if args.classifier_epochs:
        y = torch.tensor([subcategories.index(s) for s in labels])
        yh = torch.tensor([subcategories.index(s) for s in truth])
        history = train_classifier(pixels.float() / 127.5 - 1, y, pixels_h.float() / 127.5 - 1, yh,
                                   len(subcategories), args.classifier_epochs)  # fmt: skip
        report["classifier_top1_top5_per_epoch"] = history
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
