"""Style-LoRA demonstration of docs/finetuning.md: outline-only emoji data, and the before/after figure.

`build` turns the emoji dataset into black-on-white outlines (captions say `outline style`); `figure`
draws base vs base+LoRA at the same prompts and seeds and prints the style measure for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

STYLES = ("google style", "twitter style")


def outline(image: Image.Image) -> Image.Image:
    """Dark edges on white: grey-level FIND_EDGES, stretched, inverted, faint edges dropped."""
    grey = image.convert("RGB").convert("L")
    edges = np.asarray(grey.filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    edges[[0, -1], :] = 0  # FIND_EDGES marks the frame itself; the emoji never touch it
    edges[:, [0, -1]] = 0
    ink = np.clip(edges / max(float(np.percentile(edges, 99)), 1.0), 0.0, 1.0)
    ink[ink < 0.15] = 0.0
    return ImageOps.grayscale(Image.fromarray((255 * (1 - ink)).astype(np.uint8))).convert("RGB")


def build(src: Path, dst: Path, holdout_per_style: int) -> None:
    """Copy every image of train/ (and a few of holdout/) as outlines with `outline style` captions."""
    counts = {}
    for split in ("train", "holdout"):
        out = dst / split
        out.mkdir(parents=True, exist_ok=True)
        n = 0
        for style_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            pngs = sorted(style_dir.glob("*.png"))
            if split == "holdout":
                pngs = pngs[:: max(1, len(pngs) // holdout_per_style)][:holdout_per_style]
            for png in pngs:
                caption = png.with_suffix(".txt").read_text().strip()
                for style in STYLES:
                    caption = caption.replace(style, "outline style")
                stem = f"{style_dir.name}-{png.stem}"
                outline(Image.open(png)).save(out / f"{stem}.png")
                (out / f"{stem}.txt").write_text(caption)
                n += 1
        counts[split] = n
    print(json.dumps(counts))


def ink_fraction(image: Image.Image) -> float:
    """Share of pixels that are not near-white (luminance < 200): filled emoji ~0.5, outlines much less."""
    return float((np.asarray(image.convert("L")) < 200).mean())


def saturation(image: Image.Image) -> float:
    """Mean HSV saturation (0..1): outlines are grey, emoji are colourful."""
    return float(np.asarray(image.convert("HSV"))[..., 1].mean() / 255)


PROMPTS = (
    "heavy black heart, heart, outline style",  # the red heart (U+2764), by its dataset caption
    "grinning face, face-smiling, outline style",
    "birthday cake, food-sweet, outline style",  # held out: neither the model nor the LoRA saw it
    "octopus, animal-marine, outline style",  # held out
)
# the same emoji in the outline dataset, shown as the reference column (held-out ones made by `outline`)
REFERENCES = ("train/google/2764-fe0f.png", "train/google/1f600.png", "holdout/google/1f382.png",
              "holdout/google/1f419.png")  # fmt: skip


def generate(model, prompts, seeds, lora: str) -> list[list[Image.Image]]:  # noqa: ANN001
    """One image per (prompt, seed), Euler 20 steps CFG 5 at 64 px (the training sample grids' settings)."""
    from latentforge.api import txt2img

    return [
        [txt2img(model, prompt + lora, seed=s, steps=20, sampler="Euler", cfg_scale=5.0, width=64,
                 height=64)[0] for s in seeds]
        for prompt in prompts
    ]  # fmt: skip


def measures(images: list[Image.Image]) -> tuple[float, float]:
    """Mean ink fraction and mean saturation of a set of images."""
    return float(np.mean([ink_fraction(i) for i in images])), float(np.mean([saturation(i) for i in images]))


def figure(run_dir: Path, out: Path, emoji: Path, n_seeds: int, shown: int, weight: float) -> None:
    """Grid (rows: prompts; base seeds | LoRA seeds | reference outline) and the style measure table."""
    from PIL import ImageDraw

    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load

    model = load(default_model_path())
    model.use_folders(lora_dirs=[run_dir])
    seeds = list(range(n_seeds))
    base = generate(model, PROMPTS, seeds, "")
    tuned = generate(model, PROMPTS, seeds, f" <lora:final:{weight}>")
    refs = [outline(Image.open(emoji / r)) for r in REFERENCES]
    real_emoji = [Image.open(emoji / r).convert("RGB") for r in REFERENCES]
    flat = lambda rows: [im for row in rows for im in row]  # noqa: E731
    table = {
        "base model": measures(flat(base)),
        f"base + LoRA {weight}": measures(flat(tuned)),
        "real outlines (4 references)": measures(refs),
        "real emoji (same 4)": measures(real_emoji),
    }
    holdout = sorted((Path("/work/data/emoji-outline") / "holdout").glob("*.png"))
    if holdout:
        table[f"outline holdout ({len(holdout)} images)"] = measures([Image.open(p) for p in holdout])
    for name, (ink, sat) in table.items():
        print(f"| {name} | {ink:.3f} | {sat:.3f} |")

    cell, pad, label_h = 96, 8, 18
    cols = 2 * shown + 1
    grid = Image.new("RGB", (cols * cell + 2 * pad, len(PROMPTS) * cell + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), f"base model, seeds 0-{shown - 1}", fill="black")
    draw.text((shown * cell + pad + 4, 3), f"base + outline LoRA {weight}, same seeds", fill="black")
    draw.text((2 * shown * cell + 2 * pad + 4, 3), "real outline", fill="black")
    for r in range(len(PROMPTS)):
        row = base[r][:shown] + tuned[r][:shown] + [refs[r]]
        for c, im in enumerate(row):
            x = c * cell + pad * (c >= shown) + pad * (c >= 2 * shown)
            grid.paste(im.resize((cell, cell), Image.LANCZOS), (x, label_h + r * cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.quantize(256).save(out, optimize=True)  # palette PNG: the figure stays well under 300 KB
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--src", default="/work/data/emoji")
    b.add_argument("--dst", default="/work/data/emoji-outline")
    b.add_argument("--holdout-per-style", type=int, default=8)
    f = sub.add_parser("figure")
    f.add_argument("--run-dir", default="/work/runs/ftdemo")
    f.add_argument("--out", default="docs/finetuning/lora-outline.png")
    f.add_argument("--emoji", default="/work/data/emoji")
    f.add_argument("--seeds", type=int, default=8, help="seeds per prompt in the measure")
    f.add_argument("--shown", type=int, default=3, help="seeds per prompt in the figure")
    f.add_argument("--weight", type=float, default=1.0)
    args = parser.parse_args()
    if args.cmd == "build":
        build(Path(args.src), Path(args.dst), args.holdout_per_style)
    else:
        figure(Path(args.run_dir), Path(args.out), Path(args.emoji), args.seeds, args.shown, args.weight)
