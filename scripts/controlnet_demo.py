"""Does the emoji ControlNet follow edges it never saw? The evaluation and figure of docs/controlnet.md.

For each held-out emoji: control = canny(real image) (OpenCV, 100/200, at the image's 64 px, as in training);
the embedded model generates the emoji's caption at one seed without and with the ControlNet (same seed,
prompt, sampler); each generated image's canny map is scored against the control map. Two scores:

- `iou`: |C & G| / |C | G| of the two one-pixel edge maps, exact positions;
- `f1`: boundary F1 with a distance tolerance of `tolerance` px (chessboard), as the BSDS boundary benchmark
  (Martin, Fowlkes and Malik 2004) scores edges: precision = generated edge pixels within the tolerance
  of a control edge, recall = control edge pixels within the tolerance of a generated edge.

Rows of the same table: the real image's own edges (1 by construction), its VAE reconstruction (the
ceiling a latent model can reach: the f = 4 decoder's own edge shifts) and a mismatched real emoji (the
next held-out item's edges: what unrelated emoji score).

    python scripts/controlnet_demo.py ship RUNS/cn/final.safetensors   # -> src/latentforge/assets/ (fp16)
    python scripts/controlnet_demo.py evaluate --data data/emoji --out docs/controlnet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EDGE_LEVEL = 127  # canny maps are 0/255
ASSET = Path(__file__).resolve().parents[1] / "src/latentforge/assets/latentforge-emoji-canny.safetensors"


def near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within `tolerance` (chessboard distance) of a True pixel of `mask` [H, W]."""
    if tolerance <= 0:
        return mask.copy()
    t = tolerance
    padded = np.pad(mask, t)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(-t, t + 1):
        for dx in range(-t, t + 1):
            out |= padded[t + dy : t + dy + h, t + dx : t + dx + w]
    return out


def edge_scores(control: np.ndarray, generated: np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """IoU (exact) and precision/recall/F1 within `tolerance` px of two boolean edge maps [H, W]."""
    c, g = control.astype(bool), generated.astype(bool)
    union = int((c | g).sum())
    iou = int((c & g).sum()) / union if union else 1.0
    if not c.any() and not g.any():
        return {"iou": iou, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = int((g & near(c, tolerance)).sum()) / int(g.sum()) if g.any() else 0.0
    recall = int((c & near(g, tolerance)).sum()) / int(c.sum()) if c.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"iou": iou, "precision": precision, "recall": recall, "f1": f1}


def canny(image: Image.Image) -> Image.Image:
    """The training hint: sd-webui-controlnet's canny (100 / 200) at the image's own size."""
    from latentforge.pipelines.preprocessors import run_preprocessor

    array = np.asarray(image.convert("RGB"))
    return Image.fromarray(run_preprocessor("canny", array, min(array.shape[:2])))


def edges(image: Image.Image) -> np.ndarray:
    return np.asarray(canny(image))[..., 0] > EDGE_LEVEL


def _holdout(data: str, items: int) -> list[tuple[Image.Image, str]]:
    """The first `items` held-out emoji (both styles interleaved), as the training task reads them."""
    from latentforge.pipelines.images import tensor_to_pil
    from latentforge.training.tasks.common import ImageData, image_dataset

    dataset = image_dataset(ImageData(data=data, resolution=64, max_holdout_items=None), "holdout")
    n = len(dataset)  # type: ignore[arg-type]
    order = [i for pair in zip(range(n // 2), range(n // 2, n), strict=False) for i in pair]
    picked = [dataset[i] for i in order[:items]]
    return [(tensor_to_pil(item["pixels"][None])[0], item["caption"]) for item in picked]


def _generate(model, caption: str, seed: int, args: argparse.Namespace, unit) -> Image.Image:  # noqa: ANN001
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import iter_images

    request = GenerationRequest(
        prompt=caption, seed=seed, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg,
        width=64, height=64, controlnet=() if unit is None else (unit,),
    )  # fmt: skip
    (result,) = list(iter_images(model, request))
    return result.image


def _reconstruct(model, image: Image.Image) -> Image.Image:  # noqa: ANN001
    from latentforge.pipelines.images import decode_latents, encode_images, pil_to_tensor, tensor_to_pil

    pixels, _ = decode_latents(model, encode_images(model, pil_to_tensor([image])))
    return tensor_to_pil(pixels)[0]


def figure(columns: list[list[Image.Image]], scale: int) -> Image.Image:
    """Columns of equal-size tiles (control / without / with / real) -> one grid, rows as given."""
    w, h = columns[0][0].size
    grid = Image.new("RGB", (w * len(columns), h * len(columns[0])), "white")
    for x, column in enumerate(columns):
        for y, tile in enumerate(column):
            grid.paste(tile.convert("RGB"), (x * w, y * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def ship(source: str, out: Path) -> None:
    """A trained ControlNet (a run's final.safetensors) -> the fp16 file shipped beside the embedded model."""
    from latentforge.checkpoints.controlnet import load_controlnet, save_controlnet

    network = load_controlnet(source, compute_hash=False)
    save_controlnet(out, network.model, dtype=torch.float16)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")


def evaluate(args: argparse.Namespace) -> None:
    """The held-out scores (means, JSON) and the figure, into `args.out`."""
    from latentforge.checkpoints.controlnet import load_controlnet
    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load
    from latentforge.pipelines.controlnet import ControlNetUnit

    start_cpu, start_wall = time.process_time(), time.perf_counter()
    torch.manual_seed(0)
    model = load(default_model_path())
    network = load_controlnet(args.controlnet, dtype=model.dtype, device=model.device)
    holdout = _holdout(args.data, args.items)
    rows = ("without", "with", "vae_reconstruction", "real", "mismatched_real")
    scores: dict[str, list[dict[str, float]]] = {k: [] for k in rows}
    columns = []
    for i, (real, caption) in enumerate(holdout):
        hint = canny(real)
        control = np.asarray(hint)[..., 0] > EDGE_LEVEL
        unit = ControlNetUnit(image=hint, network=network, resize_mode="Just Resize")
        without = _generate(model, caption, i, args, None)
        with_control = _generate(model, caption, i, args, unit)
        images = {
            "without": without, "with": with_control, "vae_reconstruction": _reconstruct(model, real),
            "real": real, "mismatched_real": holdout[(i + 1) % len(holdout)][0],
        }  # fmt: skip
        for key, image in images.items():
            scores[key].append(edge_scores(control, edges(image), args.tolerance))
        if i < args.figure_items:
            columns.append([hint, without, with_control, real])
        print(f"{i + 1}/{len(holdout)} {caption}: f1 without {scores['without'][-1]['f1']:.3f}, "
              f"with {scores['with'][-1]['f1']:.3f}", flush=True)  # fmt: skip
    means = {k: {m: float(np.mean([s[m] for s in v])) for m in v[0]} for k, v in scores.items()}
    report = {
        "items": len(holdout),
        "controlnet": network.title,
        "settings": {k: getattr(args, k) for k in ("steps", "sampler", "cfg", "tolerance")},
        "means": means,
        "with_beats_without_f1": sum(
            w["f1"] > o["f1"] for w, o in zip(scores["with"], scores["without"], strict=True)
        ),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),
        "wall_seconds": round(time.perf_counter() - start_wall, 1),
        "torch_threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    figure(columns, 2).save(args.out / "emoji-canny-holdout.png", optimize=True)
    (args.out / "emoji-canny-metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ship", help="a run's final.safetensors -> the fp16 asset")
    p.add_argument("source")
    p.add_argument("--out", type=Path, default=ASSET)
    p = sub.add_parser("evaluate", help="held-out edge scores and the figure")
    p.add_argument("--data", default="data/emoji", help="the emoji dataset (its holdout/ split)")
    p.add_argument("--controlnet", default="latentforge-emoji-canny", help="file or shipped name")
    p.add_argument("--items", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--tolerance", type=int, default=1)
    p.add_argument("--figure-items", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("docs/controlnet"))
    args = parser.parse_args()
    if args.command == "ship":
        ship(args.source, args.out)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
