"""The README sample grid: fixed emoji prompts x fixed seeds -> one PNG, each row captioned.

    python scripts/sample_grid.py [--model M] [--out docs/plots/default-model-grid.png] [--seeds 0,1,2,3]
Default model: the embedded one (`checkpoints.loading.default_model_path()`); prompts: `GRID_PROMPTS`
(the last two are held-out captions), or one per line from --prompts FILE. Several --model (each with a
--label, default its file name) give their grids side by side, titled: the card's before/after figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_card import (  # scripts/model_card.py
    GRID_PROMPTS,
    GRID_SEEDS,
    caption_grid,
    sample_rows,
    side_by_side,
)

from latentforge.checkpoints.loading import default_model_path
from latentforge.evaluation.runs import parse_seeds, read_prompts
from latentforge.model import load
from latentforge.pipelines.request import GenerationRequest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", action="append", help="checkpoint (default: the embedded default model); repeatable"
    )
    p.add_argument(
        "--label", action="append", help="a panel's title, one per --model (default: its file name)"
    )
    p.add_argument("--out", default="docs/plots/default-model-grid.png")
    p.add_argument("--prompts", help="prompts file, one per line (default: the fixed emoji list)")
    p.add_argument("--seeds", default=",".join(map(str, GRID_SEEDS)), help="e.g. 0-3 or 0,7,42")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--size", type=int, default=0, help="image size (default: the model's)")
    p.add_argument("--cell", type=int, default=96, help="grid cell size in pixels")
    args = p.parse_args(argv)
    models = args.model or [str(default_model_path())]
    if args.label is not None and len(args.label) != len(models):
        p.error(f"--label: give one per --model ({len(models)}), got {len(args.label)}")
    prompts = read_prompts(args.prompts) if args.prompts else list(GRID_PROMPTS)
    params = GenerationRequest(
        steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg, width=args.size, height=args.size
    )
    seeds = parse_seeds(args.seeds)
    panels = [caption_grid(sample_rows(load(m), prompts, seeds, params), prompts, args.cell) for m in models]
    grid = panels[0]
    if len(models) > 1 or args.label:
        grid = side_by_side(panels, args.label or [Path(m).name for m in models])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height}, {len(prompts)} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
