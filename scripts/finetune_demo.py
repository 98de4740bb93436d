"""Style-LoRA demonstration of docs/finetuning.md: outline-only emoji data, and the before/after figure.

`build` turns the emoji dataset into black-on-white outlines (captions say `outline style`); `figure`
draws base vs base+LoRA at the same prompts and seeds and prints the style measure for both.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def subject(src: Path, dst: Path, identity: str) -> None:
    """One held-out emoji's images: skin-tone variants train, the default tone is the holdout.

    Captions are only the style (`google style`), so the emoji's name never reaches the new word.
    """
    counts = {"train": 0, "holdout": 0}
    for line in (src / "metadata.jsonl").read_text().splitlines():
        item = json.loads(line)
        if item["identity"] != identity:
            continue
        if item["split"] != "holdout":
            raise SystemExit(f"{identity} is in the model's training split; pick a held-out emoji")
        split = "holdout" if item["skin_tone"] is None else "train"
        out = dst / split
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{item['style']}-{item['unified'].lower()}"
        Image.open(src / item["file_name"]).convert("RGB").save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(f"{item['style']} style")
        counts[split] += 1
    print(json.dumps(counts))


def grey(image: Image.Image) -> Image.Image:
    """The image in grey levels (as RGB): compares shape without colour."""
    return image.convert("L").convert("RGB")


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


def generate(model, prompts, seeds, suffix: str = "") -> list[list[Image.Image]]:  # noqa: ANN001
    """One image per (prompt, seed), Euler 20 steps CFG 5 at 64 px (the training sample grids' settings).

    Rows are prompts, columns seeds; each image's noise comes from its own seed, so batching changes nothing.
    """
    from latentforge.api import request_from_options, run

    pairs = tuple((prompt + suffix, s) for prompt in prompts for s in seeds)
    request = request_from_options(prompt_seeds=pairs, batch_size=16, steps=20, sampler="Euler",
                                   cfg_scale=5.0, width=64, height=64)  # fmt: skip
    flat = run(model, request, progress=False)
    return [flat[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]


# ---- CLIP image similarity (our CLIP, the only one here: src/latentforge/assets/latentforge-emoji-clip)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] cosine similarities of the rows of `a` [N, D] and `b` [M, D] (rows need not be normalised)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def mean_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j): how close set `a` is to set `b` on average."""
    return float(cosine_matrix(a, b).mean())


def paired_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of a_i with b_i (e.g. the same seed and prompt from two models)."""
    if len(a) != len(b):
        raise ValueError(f"paired_similarity needs sets of one length, got {len(a)} and {len(b)}")
    return float(np.diagonal(cosine_matrix(a, b)).mean())


def clip_embedder():  # noqa: ANN201
    """images -> L2-normalised image embeddings [N, D] (numpy) of the embedded model's CLIP."""
    import torch

    from latentforge.checkpoints.loading import default_clip_path
    from latentforge.evaluation.extractors import load_clip_extractor

    extractor = load_clip_extractor(default_clip_path()).image

    def embed(images: list[Image.Image]) -> np.ndarray:
        pixels = np.stack([np.asarray(i.convert("RGB")) for i in images])  # [N, H, W, 3] uint8
        return extractor(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()).float().numpy()

    return embed


def load_demo_model():  # noqa: ANN201
    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load

    return load(default_model_path())


def measures(images: list[Image.Image]) -> tuple[float, float]:
    """Mean ink fraction and mean saturation of a set of images."""
    return float(np.mean([ink_fraction(i) for i in images])), float(np.mean([saturation(i) for i in images]))


def figure(
    run_dir: Path, out: Path, emoji: Path, outline_dir: Path, n_seeds: int, shown: int, weight: float
) -> None:
    """Grid (rows: prompts; base seeds | LoRA seeds | reference outline) and the style measure table."""
    from PIL import ImageDraw

    model = load_demo_model()
    seeds = list(range(n_seeds))
    base = generate(model, PROMPTS, seeds)
    with model.lora(lora_file(run_dir), weight):
        tuned = generate(model, PROMPTS, seeds)
    refs = [outline(Image.open(emoji / r)) for r in REFERENCES]
    real_emoji = [Image.open(emoji / r).convert("RGB") for r in REFERENCES]
    flat = lambda rows: [im for row in rows for im in row]  # noqa: E731
    table = {
        "base model": measures(flat(base)),
        f"base + LoRA {weight}": measures(flat(tuned)),
        "real outlines (4 references)": measures(refs),
        "real emoji (same 4)": measures(real_emoji),
    }
    holdout = sorted((outline_dir / "holdout").glob("*.png"))
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
    style_clip(base, tuned, refs, real_emoji, emoji, outline_dir, out.with_name(out.stem + "-clip.png"))


def style_sets(emoji: Path, outline_dir: Path, split: str, count: int) -> tuple[list[Path], list[Path]]:
    """`count` outline images of `split` (evenly spaced, both styles) and the originals they came from."""
    outlines = sorted((outline_dir / split).glob("*.png"))
    outlines = outlines[:: max(1, len(outlines) // count)][:count]
    originals = [emoji / split / p.stem.split("-", 1)[0] / f"{p.stem.split('-', 1)[1]}.png" for p in outlines]
    return outlines, originals


def style_clip(base, tuned, refs, real_emoji, emoji: Path, outline_dir: Path, out: Path) -> None:  # noqa: ANN001
    """CLIP image similarity of base / LoRA images to outline vs original artwork, and a nearest-centroid
    style classifier (centroids of 200 training outlines and of their 200 originals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    embed = clip_embedder()
    outlines, originals = style_sets(emoji, outline_dir, "train", 200)
    centroid_outline = embed([Image.open(p) for p in outlines]).mean(0, keepdims=True)
    centroid_colour = embed([Image.open(p) for p in originals]).mean(0, keepdims=True)

    def outline_share(e: np.ndarray) -> float:
        return float((cosine_matrix(e, centroid_outline) > cosine_matrix(e, centroid_colour)).mean())

    ref_outline, ref_colour = embed(refs), embed(real_emoji)
    rows, points = [], {}
    for name, sets in (("base model", base), ("base + outline LoRA", tuned)):
        e = [embed(images) for images in sets]  # per prompt [seeds, D]
        to_outline = np.concatenate([cosine_matrix(x, ref_outline[[r]])[:, 0] for r, x in enumerate(e)])
        to_colour = np.concatenate([cosine_matrix(x, ref_colour[[r]])[:, 0] for r, x in enumerate(e)])
        flat = np.concatenate(e)
        points[name] = (to_colour, to_outline)
        rows.append((name, to_outline.mean(), to_colour.mean(), mean_similarity(flat, centroid_outline),
                     mean_similarity(flat, centroid_colour), outline_share(flat), len(flat)))  # fmt: skip
    held_outlines, held_originals = style_sets(emoji, outline_dir, "holdout", 16)
    for name, paths in (
        ("real outlines, holdout", held_outlines),
        ("real artwork, same holdout", held_originals),
    ):
        flat = embed([Image.open(p) for p in paths])
        rows.append((name, float("nan"), float("nan"), mean_similarity(flat, centroid_outline),
                     mean_similarity(flat, centroid_colour), outline_share(flat), len(flat)))  # fmt: skip
    print(
        "| Images | sim. to its real outline | sim. to its real artwork | sim. to outline centroid "
        "| sim. to artwork centroid | classified outline | n |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, *values, n in rows:
        print(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in values) + f" | {n} |")

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    for (name, (x, y)), colour in zip(points.items(), ("tab:orange", "black"), strict=True):
        ax.scatter(x, y, s=14, c=colour, label=name, alpha=0.8)
    lo = min(min(float(v.min()) for v in p) for p in points.values()) - 0.02
    ax.plot([lo, 1], [lo, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("CLIP sim. to the prompt's real artwork")
    ax.set_ylabel("CLIP sim. to the prompt's real outline")
    ax.set_title("same prompts and seeds; above the line: closer to outline", fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def nearest_hit_share(queries: np.ndarray, gallery: np.ndarray, is_subject: np.ndarray) -> float:
    """Share of queries whose most similar gallery image is a subject image (1-NN retrieval)."""
    return float(np.asarray(is_subject, dtype=bool)[cosine_matrix(queries, gallery).argmax(1)].mean())


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], header: str, cell: int = 72) -> Image.Image:
    """Rows of images with a text label on the left (one line per `|`-separated part)."""
    from PIL import ImageDraw

    label_w, head_h = 230, 16
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * cell, head_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), header, fill="black")
    for r, (label, images) in enumerate(rows):
        for i, part in enumerate(label.split("|")):
            draw.text((4, head_h + r * cell + 4 + 12 * i), part.strip(), fill="black")
        for c, im in enumerate(images):
            grid.paste(
                im.convert("RGB").resize((cell, cell), Image.LANCZOS), (label_w + c * cell, head_h + r * cell)
            )
    return grid


def save_small(image: Image.Image, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256).save(out, optimize=True)  # palette PNG: well under 300 KB
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def subject_gallery(emoji: Path, identity: str, embed) -> tuple[np.ndarray, np.ndarray, dict]:  # noqa: ANN001
    """CLIP embeddings of all held-out real images (the 1-NN gallery), the subject mask, and the subject's
    images by (style, default tone or not)."""
    items = [json.loads(line) for line in (emoji / "metadata.jsonl").read_text().splitlines()]
    items = [d for d in items if d["split"] == "holdout"]
    gallery = embed([Image.open(emoji / d["file_name"]) for d in items])
    mask = np.array([d["identity"] == identity for d in items])
    subject = {}
    for d, e in zip(items, gallery, strict=True):
        if d["identity"] == identity:
            subject.setdefault((d["style"], d["skin_tone"] is None), []).append(e)
    return gallery, mask, {k: np.stack(v) for k, v in subject.items()}


STYLE_NAMES = ("google", "twitter")


def ti_figure(run_dir: Path, emoji: Path, identity: str, name: str, steps: list[str], n_seeds: int,
              shown: int, out: Path) -> None:  # fmt: skip
    """Textual Inversion before/after: CLIP similarity of generated images to the held-out real images."""
    import torch

    from latentforge.checkpoints.embeddings import read_embedding, write_embedding
    from latentforge.training.checkpointing import load_checkpoint
    from latentforge.training.config import load_config

    ti = load_config(run_dir / "config.toml").task_options
    token, init_word, count = ti["token"], ti.get("init_word", "*"), ti.get("num_vectors", 1)
    model = load_demo_model()
    conditions = {
        f"emoji's name ({name})": f"{name}, {{style}} style",
        f"class word ({init_word})": f"{init_word}, {{style}} style",
    }
    folder = run_dir / "eval-embeddings"
    folder.mkdir(exist_ok=True)
    for step in steps:  # the word's vectors at step 0 (the task's init), at checkpoints, and the export
        word = f"{token}-step{step}"
        if step == "final":
            path = run_dir / "embeddings" / f"{token}.safetensors"
            label = f"TI after ({read_embedding(path).step} steps)"
        else:
            if step == "0":  # `init_word`'s token embeddings, cycled: what the task starts from
                ids = model.tokenizer.encode(init_word)
                table = model.text_encoder.text_model.embeddings.token_embedding.weight.detach().float()
                vectors = table[torch.tensor(ids)][torch.arange(count) % len(ids)]
                label = f"TI step 0 (= {init_word} x{count})"
            else:
                state = load_checkpoint(run_dir / "checkpoints" / f"step_{step}.pt")
                vectors = (state.get("ema") or state["model"])["vectors"]
                label = f"TI step {step}"
            path = write_embedding(folder / f"{word}.safetensors", word, vectors)
        model.load_embedding(path, word)
        conditions[label] = f"{word}, {{style}} style"
    embed = clip_embedder()
    gallery, mask, subject = subject_gallery(emoji, identity, embed)
    held = [Image.open(emoji / "holdout" / s / f"{identity.lower()}.png") for s in STYLE_NAMES]
    held_grey = [embed([grey(im)]) for im in held]  # shape without colour (the skin tones differ)
    seeds = list(range(n_seeds))
    rows, figure_rows = [], []
    for label, template in conditions.items():
        images = generate(model, [template.format(style=s) for s in STYLE_NAMES], seeds)
        e = [embed(row) for row in images]
        pairs = list(zip(e, STYLE_NAMES, strict=True))
        to_held = np.mean([mean_similarity(x, subject[(s, True)]) for x, s in pairs])
        to_train = np.mean([mean_similarity(x, subject[(s, False)]) for x, s in pairs])
        to_grey = np.mean(
            [
                mean_similarity(embed([grey(i) for i in row]), h)
                for row, h in zip(images, held_grey, strict=True)
            ]
        )
        hits = nearest_hit_share(np.concatenate(e), gallery, mask)
        rows.append((label, template.format(style="<style>"), to_held, to_grey, to_train, hits, 2 * n_seeds))
        text = f"{label}|held-out sim {to_held:.3f}, grey {to_grey:.3f}|1-NN is {name}: {hits:.0%}"
        figure_rows.append((text, images[0][:shown] + images[1][:shown]))
    nan = float("nan")
    for s, h in zip(STYLE_NAMES, held_grey, strict=True):  # context: the real training images of the style
        train_images = [
            Image.open(p) for p in sorted((emoji / "holdout" / s).glob(f"{identity.lower()}-*.png"))
        ]
        real = mean_similarity(subject[(s, False)], subject[(s, True)])
        real_grey = mean_similarity(embed([grey(i) for i in train_images]), h)
        rows.append((f"real training images ({s})", "-", real, real_grey, nan, nan, len(train_images)))
    others = gallery[~mask]
    rows.append((f"real images of the {len(others)} other held-out emoji", "-",
                 np.mean([mean_similarity(others, subject[(s, True)]) for s in STYLE_NAMES]), nan, nan, nan,
                 len(others)))  # fmt: skip
    print(
        f"| Prompt | text | sim. to held-out {name} | same, greyscale | sim. to its training images "
        f"| 1-NN is {name} | n |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, text, *values, n in rows:
        cells = " | ".join(
            "-" if np.isnan(v) else (f"{v:.0%}" if i == 3 else f"{v:.3f}") for i, v in enumerate(values)
        )
        print(f"| {label} | `{text}` | {cells} | {n} |")
    figure_rows.append(("held-out real images|(google, twitter)", held))
    header = f"seeds 0-{shown - 1} google style | seeds 0-{shown - 1} twitter style (Euler 20, CFG 5)"
    save_small(labelled_grid(figure_rows, header), out)


def dreambooth_figure(prior_dir: Path, noprior_dir: Path, emoji: Path, identity: str, name: str,
                      class_word: str, token: str, n_seeds: int, shown: int, out: Path) -> None:  # fmt: skip
    """Language drift: the bare class prompt from base / no-prior / prior models at the same seeds."""
    model = load_demo_model()
    embed = clip_embedder()
    gallery, mask, subject = subject_gallery(emoji, identity, embed)
    subject_all = np.concatenate(list(subject.values()))
    seeds = list(range(n_seeds))
    class_prompts = [f"{class_word}, {s} style" for s in STYLE_NAMES]
    instance_prompts = [f"{token} {class_word}, {s} style" for s in STYLE_NAMES]
    made = {}
    for label, lora in (("base model", None), ("DreamBooth, no prior", noprior_dir),
                        ("DreamBooth, prior", prior_dir)):  # fmt: skip
        if lora is None:
            made[label] = generate(model, class_prompts + instance_prompts, seeds)
        else:
            with model.lora(lora_file(lora)):
                made[label] = generate(model, class_prompts + instance_prompts, seeds)
    base_class = np.concatenate([embed(row) for row in made["base model"][:2]])
    held = [subject[(s, True)] for s in STYLE_NAMES]
    rows, figure_rows = [], []
    for label, images in made.items():
        cls = np.concatenate([embed(row) for row in images[:2]])
        inst = [embed(row) for row in images[2:]]
        to_base = paired_similarity(cls, base_class)
        to_subject = mean_similarity(cls, subject_all)
        hits = nearest_hit_share(cls, gallery, mask)
        fidelity = np.mean([mean_similarity(x, h) for x, h in zip(inst, held, strict=True)])
        rows.append((label, to_base, to_subject, hits, fidelity))
        figure_rows.append((f"{label}|'{class_prompts[0]}': sim to base {to_base:.3f}|"
                            f"sim to {name} {to_subject:.3f}, 1-NN {hits:.0%}",
                            images[0][:shown] + images[2][:shown]))  # fmt: skip
    print(
        f"| Model | class prompt: sim. to base, same seed | class prompt: sim. to real {name} "
        f"| class prompt: 1-NN is {name} | `{token} {class_word}`: sim. to held-out {name} |"
    )
    print("| --- | --- | --- | --- | --- |")
    for label, *values in rows:
        cells = " | ".join(f"{v:.0%}" if i == 2 else f"{v:.3f}" for i, v in enumerate(values))
        print(f"| {label} | {cells} |")
    header = (f"'{class_prompts[0]}' seeds 0-{shown - 1} | '{instance_prompts[0]}' same seeds "
              f"({2 * n_seeds} images per number, both styles)")  # fmt: skip
    save_small(labelled_grid(figure_rows, header), out)


def export_checkpoint(run_dir: Path, step: int) -> Path:
    """The run's export (LoRA, embedding ...) of `checkpoints/step_N.pt` (EMA weights if kept), written to
    `run_dir/step_N/final.safetensors` by the task's own `export`: a shortened run without retraining."""
    from latentforge.training.checkpointing import load_checkpoint
    from latentforge.training.config import load_config
    from latentforge.training.tasks import TASKS

    config = dataclasses.replace(load_config(run_dir / "config.toml"), max_steps=step)  # ss_steps, `step`
    task = TASKS[config.task](config)
    model = task.trainable()
    state = load_checkpoint(run_dir / "checkpoints" / f"step_{step}.pt")
    model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    out = run_dir / f"step_{step}" / "final.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    task.export(model, out)
    print(f"wrote {out}")
    return out


def lora_file(path: Path) -> Path:
    """A LoRA file, or a run directory's `final.safetensors`."""
    return path if path.suffix == ".safetensors" else path / "final.safetensors"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--src", default="/work/data/emoji")
    b.add_argument("--dst", default="/work/data/emoji-outline")
    b.add_argument("--holdout-per-style", type=int, default=8)
    j = sub.add_parser("subject", help="one held-out emoji's images (for TI and DreamBooth)")
    j.add_argument("--src", default="/work/data/emoji")
    j.add_argument("--dst", default="/work/data/ok-hand")
    j.add_argument("--identity", default="1F44C")
    f = sub.add_parser("figure")
    f.add_argument("--run-dir", default="/work/runs/ftdemo")
    f.add_argument("--out", default="docs/finetuning/lora-outline.png")
    f.add_argument("--emoji", default="/work/data/emoji")
    f.add_argument("--outline", default="/work/data/emoji-outline")
    f.add_argument("--seeds", type=int, default=8, help="seeds per prompt in the measure")
    f.add_argument("--shown", type=int, default=3, help="seeds per prompt in the figure")
    f.add_argument("--weight", type=float, default=1.0)
    t = sub.add_parser("ti", help="Textual Inversion before/after CLIP figure")
    t.add_argument("--run-dir", default="/work/runs/ftdemo/ti-ok-hand")
    t.add_argument("--out", default="docs/finetuning/ti-ok-hand-clip.png")
    t.add_argument("--emoji", default="/work/data/emoji")
    t.add_argument("--identity", default="1F44C")
    t.add_argument("--name", default="ok hand sign", help="the emoji's name in the dataset's captions")
    t.add_argument("--steps", default="0,final", help="0 (the init), checkpoint steps, final (the export)")
    t.add_argument("--seeds", type=int, default=8, help="seeds per style in the measure")
    t.add_argument("--shown", type=int, default=4, help="seeds per style in the figure")
    d = sub.add_parser("dreambooth", help="DreamBooth with/without prior: language drift figure")
    d.add_argument("--prior-dir", default="/work/runs/ftdemo/db-prior")
    d.add_argument("--noprior-dir", default="/work/runs/ftdemo/db-noprior")
    d.add_argument("--out", default="docs/finetuning/dreambooth-drift.png")
    d.add_argument("--emoji", default="/work/data/emoji")
    d.add_argument("--identity", default="1F44C")
    d.add_argument("--name", default="ok hand sign")
    d.add_argument("--class-word", default="hand")
    d.add_argument("--token", default="sks")
    d.add_argument("--seeds", type=int, default=8, help="seeds per style in the measure")
    d.add_argument("--shown", type=int, default=4, help="seeds in the figure")
    x = sub.add_parser("export", help="a run's export of one checkpoint (run_dir/step_N/final.safetensors)")
    x.add_argument("--run-dir", required=True)
    x.add_argument("--step", type=int, required=True)
    args = parser.parse_args()
    if args.cmd == "build":
        build(Path(args.src), Path(args.dst), args.holdout_per_style)
    elif args.cmd == "subject":
        subject(Path(args.src), Path(args.dst), args.identity)
    elif args.cmd == "export":
        export_checkpoint(Path(args.run_dir), args.step)
    elif args.cmd == "ti":
        ti_figure(Path(args.run_dir), Path(args.emoji), args.identity, args.name, args.steps.split(","),
                  args.seeds, args.shown, Path(args.out))  # fmt: skip
    elif args.cmd == "dreambooth":
        dreambooth_figure(Path(args.prior_dir), Path(args.noprior_dir), Path(args.emoji), args.identity,
                          args.name, args.class_word, args.token, args.seeds, args.shown,
                          Path(args.out))  # fmt: skip
    else:
        figure(Path(args.run_dir), Path(args.out), Path(args.emoji), Path(args.outline), args.seeds,
               args.shown, args.weight)  # fmt: skip
