"""Does the model draw the subcategory it is asked for? `python scripts/subcategory_adherence.py --data DATA
--out DIR [--model M] [--clip CLIP] [--seeds 0,1]`.

For every emoji subcategory of the dataset (99) and each style (google, twitter), generates one image per
seed from the prompt "<subcategory>, <style> style" (the dataset's own words for it, as in the name-less
caption variants; with `--names`, "<name>, <style> style" with the name of one training emoji of the
subcategory, the way a person types a prompt), then asks a classifier of subcategories which ones it sees:
a linear probe (multinomial logistic regression) on our CLIP's L2-normalised image embeddings, fitted on
the real training artwork. Reports how often the intended subcategory is in the probe's top 5 (and top 1),
and the same for the real held-out artwork (290 emoji no model saw): the ceiling of what the probe can
recognise in unseen images.

The probe is part of the measuring instrument: compare models with the same `--clip` (the default is the
package's CLIP, the one the model card uses). Writes DIR/adherence.json, DIR/adherence.md and
DIR/adherence.png (every generated image framed green when the subcategory is in the top 5, red when not).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from model_card import CardSettings  # scripts/model_card.py: the card's sampler, steps, CFG and size
from PIL import Image, ImageDraw

from latentforge.evaluation.extractors import EvalExtractor, load_clip_extractor
from latentforge.pipelines.runner import run

STYLES = ("google", "twitter")


def read_records(data: Path) -> list[dict]:
    lines = (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def embed(extractor: EvalExtractor, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of RGB images, [N, D] float32."""
    size = extractor.input_size
    pixels = torch.stack(
        [torch.from_numpy(np.array(i.convert("RGB").resize((size, size), Image.BICUBIC))) for i in images]
    ).permute(0, 3, 1, 2)
    with torch.inference_mode():
        features = torch.cat([extractor.image(chunk) for chunk in pixels.split(64)]).float()
    return torch.nn.functional.normalize(features, dim=1)


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-4
) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS (deterministic: zero initialisation)."""
    probe = torch.nn.Linear(features.shape[1], classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=500, history_size=20)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        fit = torch.nn.functional.cross_entropy(probe(features * 10), labels)
        loss = fit + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def hits(
    probe: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: intended class ranked first, intended class in the top 5."""
    with torch.no_grad():
        top5 = probe(features * 10).topk(5, dim=1).indices
    return top5[:, 0] == labels, (top5 == labels[:, None]).any(1)


def tile_grid(images: list[Image.Image], ok: list[bool], labels: list[str], columns: int = 18) -> Image.Image:
    """Each image framed green (top-5 hit) or red (miss), its prompt's subcategory written under it."""
    side, frame, text = images[0].width, 3, 22
    cell_w, cell_h = side + 2 * frame + 6, side + 2 * frame + text
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, good, label) in enumerate(zip(images, ok, labels, strict=True)):
        x, y = (i % columns) * cell_w + 3, (i // columns) * cell_h
        colour = (30, 160, 60) if good else (210, 40, 40)
        draw.rectangle([x, y, x + side + 2 * frame - 1, y + side + 2 * frame - 1], fill=colour)
        sheet.paste(image.convert("RGB"), (x + frame, y + frame))
        for line, part in enumerate((label[:12], label[12:24])):
            draw.text((x, y + side + 2 * frame + 1 + 10 * line), part, fill=(0, 0, 0))
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="emoji dataset root (metadata.jsonl)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", help="checkpoint (default: the embedded default model)")
    p.add_argument("--clip", help="CLIP export whose image tower the probe reads (default: the package's)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one image per prompt and seed")
    p.add_argument(
        "--names",
        action="store_true",
        help="prompt with the name of the subcategory's first training emoji without a skin tone, as a person"
        ' types it ("red apple, google style"), instead of the subcategory',
    )
    args = p.parse_args(argv)

    from latentforge.checkpoints.loading import default_clip_path, default_model_path
    from latentforge.model import load

    records = read_records(args.data)
    train = [r for r in records if r["split"] == "train"]
    holdout = [r for r in records if r["split"] == "holdout"]
    names = sorted({r["subcategory"] for r in train})
    index = {name: i for i, name in enumerate(names)}
    extractor = load_clip_extractor(args.clip or default_clip_path())

    def real(rs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [Image.open(args.data / r["file_name"]) for r in rs]
        return embed(extractor, images), torch.tensor([index[r["subcategory"]] for r in rs])

    train_x, train_y = real(train)
    probe = fit_probe(train_x, train_y, len(names))
    holdout_x, holdout_y = real(holdout)
    real_top1, real_top5 = hits(probe, holdout_x, holdout_y)
    train_top1, _ = hits(probe, train_x, train_y)

    model = load(Path(args.model) if args.model else default_model_path())
    settings = CardSettings()
    base = replace(settings.params(), batch_size=1)
    seeds = [int(s) for s in args.seeds.split(",")]
    words = {name: name for name in names}
    if args.names:
        for r in reversed(train):  # the first record of each subcategory wins
            if not r.get("skin_tone"):
                words[r["subcategory"]] = r["name"]
    prompts = [(name, style) for name in names for style in STYLES]
    images, labels = [], []
    for number, (name, style) in enumerate(prompts):
        for seed in seeds:
            request = replace(base, prompt=f"{words[name]}, {style} style", seed=seed)
            images.append(run(model, request, progress=False)[0].image)
            labels.append(index[name])
        print(f"\r{number + 1}/{len(prompts)} prompts", end="", file=sys.stderr)
    print(file=sys.stderr)
    gen_top1, gen_top5 = hits(probe, embed(extractor, images), torch.tensor(labels))

    report = {
        "model": str(args.model or default_model_path()),
        "clip": str(args.clip or default_clip_path()),
        "subcategories": len(names),
        "generated_images": len(images),
        "seeds": seeds,
        "prompts": f"{'<first emoji name>' if args.names else '<subcategory>'}, <style> style",
        "sampler": f"{settings.sampler}, {settings.steps} steps, CFG {settings.cfg_scale}",
        "generated_top1": gen_top1.float().mean().item(),
        "generated_top5": gen_top5.float().mean().item(),
        "real_holdout_top1": real_top1.float().mean().item(),
        "real_holdout_top5": real_top5.float().mean().item(),
        "real_holdout_images": len(holdout),
        "probe_train_top1": train_top1.float().mean().item(),
        "misses": sorted({names[y] for y, ok in zip(labels, gen_top5.tolist(), strict=True) if not ok}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adherence.json").write_text(json.dumps(report, indent=2) + "\n")
    table = [
        "| images | subcategory in the probe's top 5 | top 1 |",
        "|---|---|---|",
        f"| generated, {len(images)} ({len(names)} subcategories x {len(STYLES)} styles"
        f" x {len(seeds)} seeds) "
        f"| {report['generated_top5']:.3f} | {report['generated_top1']:.3f} |",
        f"| real held-out artwork, {len(holdout)} (the ceiling) | {report['real_holdout_top5']:.3f} "
        f"| {report['real_holdout_top1']:.3f} |",
    ]
    (args.out / "adherence.md").write_text("\n".join(table) + "\n")
    tile_grid(images, gen_top5.tolist(), [words[names[y]] for y in labels]).save(args.out / "adherence.png")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
