"""Export a training run's checkpoint as the run's own export would (EMA weights if it keeps them).

A long run writes `final.safetensors` only when it reaches `max_steps`; this exports any checkpoint of a
run still in progress (or stopped), without touching it, so a later stage or an evaluation can use it:

    python scripts/export_checkpoint.py RUN_DIR [--step N] [--out PATH] [--eval] [--vae FILE]

`--eval` also prints the task's holdout evaluation of those weights (float32), the numbers the run logs
at `eval_every`. The run's `config.toml` (written by `latentforge train`) says which task it is.
`--vae` (U-Net runs) swaps a decoder fine-tune of the run's VAE into the export, as
`ship_default_model.py --vae` does: a VAE file or a model holding one, such as the shipped default model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from latentforge.training import checkpointing
from latentforge.training.config import load_config
from latentforge.training.tasks import TASKS


def export_checkpoint(
    run_dir: Path, step: int | None, out: Path | None, evaluate: bool, vae: Path | None = None
) -> dict:
    config = load_config(run_dir / "config.toml")
    checkpoints = dict(checkpointing.list_checkpoints(run_dir))
    if not checkpoints:
        raise SystemExit(f"{run_dir} has no checkpoints")
    step = max(checkpoints) if step is None else step
    if step not in checkpoints:
        raise SystemExit(f"{run_dir} has no checkpoint of step {step}; it has steps {sorted(checkpoints)}")
    state = checkpointing.load_checkpoint(checkpoints[step])
    task = TASKS[config.task](config)
    module = task.trainable()
    module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    module.eval()
    out = out or run_dir / f"step-{step:07d}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    task.export(module, out)
    if vae is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from ship_default_model import swap_fine_tuned_vae  # the same check that only the decoder differs

        swap_fine_tuned_vae(out, vae)
    result: dict = {"run_dir": str(run_dir), "step": step, "export": str(out), "elapsed_s": state["elapsed"]}
    if evaluate:
        with torch.no_grad():
            result["eval"] = task.evaluate(module)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--out", type=Path, help="default: RUN_DIR/step-NNNNNNN.safetensors")
    p.add_argument("--eval", action="store_true", help="also print the task's holdout evaluation")
    p.add_argument("--vae", type=Path, help="swap this decoder fine-tune (or a model's VAE) into the export")
    args = p.parse_args(argv)
    print(json.dumps(export_checkpoint(args.run_dir, args.step, args.out, args.eval, args.vae), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
