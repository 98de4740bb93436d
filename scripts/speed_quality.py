"""Quality of the speed options on the embedded model: FID-CLIP and CLIP score against the held-out
images (the model card's harness, `latentforge.evaluation`), FID-CLIP and PSNR against the exact path's
images at equal seeds, and seconds per image; one row per option.

    OMP_NUM_THREADS=1 python scripts/speed_quality.py --data /work/data/emoji --prompts 64 --out runs/speed

Prompts are the first N held-out captions, one seed each (seed = index); DPM++ 2M, 20 steps, CFG 7.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.checkpoints.loading import default_clip_path, default_model_path
from latentforge.evaluation.evaluate import evaluate
from latentforge.evaluation.extractors import load_extractor
from latentforge.evaluation.runs import read_prompts
from latentforge.model import load
from latentforge.pipelines.infotext import save_png
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run

VARIANTS: dict[str, dict[str, object]] = {
    "exact": {},
    "NGMS 1 (every other step)": {"s_min_uncond": 1.0},
    "NGMS 1, all steps": {"s_min_uncond": 1.0, "s_min_uncond_all": True},
    "CFG cutoff 0.5": {"cfg_cutoff": 0.5},
    "ToMe 0.5 (max downsample 1)": {"token_merging_ratio": 0.5},
    "ToMe 0.5 (max downsample 2)": {"token_merging_ratio": 0.5, "token_merging_max_downsample": 2},
    "DeepCache 2": {"deepcache_interval": 2},
    "DeepCache 3": {"deepcache_interval": 3},
    "DeepCache 2 branch 3": {"deepcache_interval": 2, "deepcache_branch": 3},
    "DeepCache 3 branch 3": {"deepcache_interval": 3, "deepcache_branch": 3},
    "fast decode (TAESD)": {"fast_decode": True},  # the embedded model's shipped tiny decoder
}


def psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="the emoji dataset (DATA/holdout is the reference)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", default="runs/speed")
    parser.add_argument("--variants", help="comma-separated subset of the row names")
    args = parser.parse_args()
    out = Path(args.out)
    holdout = Path(args.data) / "holdout"
    prompts = read_prompts(holdout)[: args.prompts]
    model = load(default_model_path())
    extractor = load_extractor(f"clip:{default_clip_path()}")
    base = GenerationRequest(negative_prompt="", steps=20, sampler="DPM++ 2M", cfg_scale=7.0, batch_size=8)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    rows = []
    for name in ["exact", *[n for n in names if n != "exact"]]:
        folder = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        request = replace(base, **VARIANTS[name])  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        pairs = tuple((prompt, i) for i, prompt in enumerate(prompts))  # seed i for prompt i in every row
        start = time.process_time()
        results = run(model, replace(request, prompt_seeds=pairs), progress=False)
        cpu = (time.process_time() - start) / len(results)
        paths = []
        for i, result in enumerate(results):
            paths.append(folder / f"{i:05d}-{result.seed}.png")
            save_png(result.image, paths[-1], result.infotext)
        images = [result.image for result in results]
        vs_holdout = evaluate(
            images,
            holdout,
            extractor=extractor,
            metrics=("fid", "clip_score"),
            captions=prompts,
            progress=False,
        ).result["values"]
        row = {"variant": name, "cpu_s_per_image": cpu, "fid_clip": vs_holdout["fid"],
               "clip_score": vs_holdout["clip_score"]}  # fmt: skip
        if name != "exact":
            exact_dir = out / "exact"
            exact = sorted(exact_dir.glob("*.png"))
            vs_exact = evaluate(
                images, [Image.open(p).convert("RGB") for p in exact], extractor=extractor, metrics=("fid",),
                progress=False,
            ).result["values"]  # fmt: skip
            row["fid_clip_vs_exact"] = vs_exact["fid"]
            row["psnr_vs_exact"] = float(np.mean([psnr(a, b) for a, b in zip(paths, exact, strict=True)]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "speed_quality.json").write_text(json.dumps(rows, indent=2))
    print(
        "\n| option | CPU s/image | FID-CLIP (holdout) | CLIP score | FID-CLIP vs exact | PSNR vs exact dB |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['cpu_s_per_image']:.2f} | {r['fid_clip']:.3f} | {r['clip_score']:.1f} | "
            f"{r.get('fid_clip_vs_exact', 0):.3f} | {r.get('psnr_vs_exact', math.inf):.1f} |"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
