"""The default model's card numbers: `python scripts/default_model_card.py [--model M --clip CLIP] --data DATA
--out DIR [--images 1000] [--quick] [--parts comparison,steps,cfg,speed] [--samplers A,B]`.

Writes DIR/metrics.json, DIR/{comparison,steps,cfg,speed,tables}.md and DIR/{steps,cfg}.png (plus every
run's own report under DIR/comparison, DIR/steps and DIR/cfg); docs/default-model.md includes the tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_card import PARTS, CardInputs, CardSettings, model_card  # scripts/model_card.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: the embedded default model)")
    p.add_argument("--clip", help="CLIP export of `latentforge train clip` (default: the embedded model's)")
    p.add_argument("--data", required=True, help="emoji-layout dataset root with train/ and holdout/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, help="generated images per (model, prompt set) (default 1000)")
    p.add_argument("--sweep-images", type=int, help="images per steps/CFG sweep point (default 500)")
    p.add_argument("--quick", action="store_true", help="tens of images: checks the pipeline, not the model")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--size", type=int, help="image size (default 64)")
    p.add_argument("--speed-repeats", type=int, help="timed txt2img runs (default 10)")
    p.add_argument("--samplers", help="steps-sweep samplers, comma-separated (default DDIM,Euler,DPM++ 2M)")
    p.add_argument(
        "--no-baselines", action="store_true", help="comparison: ours only (no untrained / nearest rows)"
    )
    p.add_argument("--prompt-sets", help="comparison: train_prompts,holdout_prompts (default both)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        name: value
        for name, value in (
            ("images", args.images),
            ("sweep_images", args.sweep_images),
            ("size", args.size),
            ("speed_repeats", args.speed_repeats),
        )
        if value is not None
    }
    if args.no_baselines:
        overrides["baselines"] = False
    if args.prompt_sets:
        overrides["prompt_sets"] = tuple(name.strip() for name in args.prompt_sets.split(",") if name.strip())
    if args.samplers:
        overrides["samplers"] = tuple(name.strip() for name in args.samplers.split(",") if name.strip())
    settings = CardSettings.quick(**overrides) if args.quick else CardSettings(**overrides)
    if args.model is None or args.clip is None:
        from latentforge.checkpoints.loading import default_clip_path, default_model_path

        args.model = args.model or default_model_path()
        args.clip = args.clip or default_clip_path()
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    card = model_card(CardInputs(args.model, args.clip, args.data, parts), args.out, settings)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'tables.md'}")
    speed = card.get("speed")
    if speed:
        print(f"txt2img median {speed['generate_median_s']:.3f} s, load {speed['load_median_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
