"""The LDM downsampling-factor study in miniature: equal-compute U-Nets on f = 1, 4, 8 trained for the same
wall time, FID-CLIP at every checkpoint, FID vs training time in a plot.

    python scripts/downsampling_study.py --budget-minutes 60 \
        --features clip:runs/default/clip/final.safetensors \
        --out runs/study [--factors 4,8,1] [--evals 6] [--images 290] [--set task_options.data=DATA ...]

Per factor f (configs/default/study_f{f}.toml): train the f's VAE with configs/default/vae.toml when the
config's `task_options.vae` file is missing (not counted in the budget, as LDM's first stages were
pretrained); measure the U-Net step time in a short probe run; train with max_steps = budget / step time
and checkpoint_every = max_steps / evals (`latentforge train unet`; the loop has no time-based stop); then
export every checkpoint's EMA weights as a model and evaluate it with `latentforge eval`'s machinery against
the holdout images at the training resolution, beside the first stage's own floor (its reconstructions of
the same images). The plan is saved, so a re-run resumes instead of re-planning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentforge.evaluation.evaluate import compute_features
from latentforge.evaluation.extractors import load_extractor
from latentforge.evaluation.model_card import CARD_METRICS, choose_prompts
from latentforge.evaluation.runs import generate_and_evaluate
from latentforge.model import load
from latentforge.pipelines.images import tensor_to_pil
from latentforge.pipelines.request import GenerationRequest
from latentforge.training.checkpointing import list_checkpoints, load_checkpoint
from latentforge.training.config import load_config
from latentforge.training.logging import read_log
from latentforge.training.loop import run_training
from latentforge.training.tasks.common import image_dataset
from latentforge.training.tasks.unet import make_unet_task

ROOT = Path(__file__).resolve().parent.parent
VAE_CONFIG = ROOT / "configs" / "default" / "vae.toml"


def study_config(factor: int) -> Path:
    return ROOT / "configs" / "default" / f"study_f{factor}.toml"


def ensure_vae(config_path: Path, overrides: Sequence[str], vae_steps: int | None) -> None:
    """Train the config's first stage with configs/default/vae.toml when its `task_options.vae` is missing."""
    config = load_config(config_path, list(overrides))
    options = config.task_options
    vae = options.get("vae")
    if vae is None or Path(vae).is_file():
        return
    vae_overrides = [f"run_dir={Path(vae).parent}", f"task_options.data={options.get('data', 'synthetic')}"]
    vae_overrides += [
        f"task_options.vae.{k}={json.dumps(v)}" for k, v in options.get("vae_config", {}).items()
    ]
    if vae_steps is not None:
        vae_overrides.append(f"max_steps={vae_steps}")
    print(f"training the first stage {vae} ({config_path.name})")
    artefact = run_training("vae", VAE_CONFIG, vae_overrides)
    if artefact.resolve() != Path(vae).resolve():
        raise RuntimeError(f"the VAE run wrote {artefact}, not {vae}: set task_options.vae to it")


def measure_step_seconds(config_path: Path, overrides: Sequence[str], run_dir: Path, steps: int) -> float:
    """Seconds per U-Net step from a probe run of `steps` steps (log.csv's loop clock, first quarter
    skipped: lazy initialisation); a finished probe is read back, not re-run."""
    probe = [*overrides, f"run_dir={run_dir}", f"max_steps={steps}", "log_every=1"]
    probe += ["checkpoint_every=0", "eval_every=0", "sample_every=0", "keep_checkpoints=1"]
    if not (run_dir / "final.safetensors").is_file():
        run_training("unet", config_path, probe)
    times = {int(row["step"]): float(row["time"]) for row in read_log(run_dir / "log.csv") if row.get("time")}
    first = max(1, steps // 4)
    if first not in times or steps not in times or steps <= first:
        raise RuntimeError(f"probe log {run_dir / 'log.csv'} lacks steps {first} and {steps}; use more steps")
    return (times[steps] - times[first]) / (steps - first)


def plan_run(
    run_dir: Path, evals: int, budget_seconds: float | None, step_seconds: float | None, steps: int | None
) -> dict[str, Any]:
    """max_steps (given, or the wall-time budget over the measured step time) and checkpoint_every; saved
    in run_dir/plan.json and reused on re-runs (a resumed run must keep max_steps)."""
    path = run_dir / "plan.json"
    if path.is_file():
        return json.loads(path.read_text())
    if steps is None:
        assert budget_seconds is not None and step_seconds is not None, "plan_run needs steps or a budget"
        steps = int(budget_seconds / step_seconds)
    max_steps = max(1, steps)
    plan = {
        "budget_seconds": budget_seconds,
        "step_seconds": step_seconds,
        "max_steps": max_steps,
        "checkpoint_every": max(1, math.ceil(max_steps / evals)),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def write_reference(config_path: Path, overrides: Sequence[str], out: Path) -> list[str]:
    """The holdout split at the training resolution as PNG + .txt (the FID reference); returns captions."""
    from latentforge.training.tasks.common import ImageData, parse_options
    from latentforge.training.tasks.unet import UNetTaskOptions

    config = load_config(config_path, list(overrides))
    options: ImageData = parse_options(UNetTaskOptions, config.task_options, "unet")
    dataset = image_dataset(options, "holdout", seed=config.seed)
    out.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        tensor_to_pil(item["pixels"][None].float())[0].save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(item["caption"] + "\n")
        captions.append(item["caption"])
    return captions


def evaluate_checkpoints(
    config_path: Path,
    overrides: Sequence[str],
    run_dir: Path,
    reference: Any,
    prompts: tuple[list[str], list[int]],
    extractor: Any,
    params: GenerationRequest,
    progress: bool,
) -> list[dict[str, Any]]:
    """FID-CLIP (and CLIP score, precision/recall) of each checkpoint's EMA weights, with its loop time."""
    config = load_config(config_path, [*overrides, f"run_dir={run_dir}"])
    task = make_unet_task(config)
    points = []
    for step, path in list_checkpoints(run_dir):
        out = run_dir / "eval" / f"step{step:07d}"
        if (out / "metrics.json").is_file():
            result = json.loads((out / "metrics.json").read_text())
        else:
            state = load_checkpoint(path)
            task.unet.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
            model_path = run_dir / "eval" / f"step{step:07d}.safetensors"
            model_path.parent.mkdir(parents=True, exist_ok=True)
            task.export(task.unet, model_path)
            model = load(model_path, compute_hash=False)
            result = generate_and_evaluate(
                model, params, *prompts, reference, out, extractor=extractor, metrics=CARD_METRICS,
                overwrite=True, progress=progress,
            )  # fmt: skip
            result["elapsed"] = state["elapsed"]
            (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            model_path.unlink()
        points.append({"step": step, "seconds": result["elapsed"], **result["values"]})
    return points


def run_study(
    configs: dict[int, Path],
    out: str | os.PathLike,
    budget_seconds: float | None,
    features: str,
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    evals: int = 6,
    images: int = 290,
    probe_steps: int = 20,
    vae_steps: int | None = None,
    sample_steps: int = 20,
    cfg_scale: float = 5.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every factor of `configs` ({f: study config}) for the same wall time
    (`budget_seconds`) or, given `steps`, the same number of steps (equal compute, since the configs cost
    the same FLOPs per image; robust to other load on the machine); writes study.json, study.md and
    study.png into `out` and returns the study."""
    out = Path(out)
    extractor = load_extractor(features)
    study: dict[str, Any] = {
        "budget_seconds": budget_seconds, "steps": steps, "features": extractor.spec, "factors": {}
    }  # fmt: skip
    reference_dir = out / "reference"
    captions = write_reference(next(iter(configs.values())), overrides, reference_dir)
    reference = compute_features(reference_dir, extractor, label="reference", progress=progress)
    prompts = choose_prompts(captions, images, seed=0)
    for factor, config_path in configs.items():
        ensure_vae(config_path, overrides, vae_steps)
        run_dir = out / f"f{factor}"
        step_seconds = (
            None
            if steps
            else measure_step_seconds(config_path, overrides, out / f"probe_f{factor}", probe_steps)
        )
        plan = plan_run(run_dir, evals, budget_seconds, step_seconds, steps)
        plan["batch_size"] = load_config(config_path, list(overrides)).batch_size
        run_overrides = [*overrides, f"run_dir={run_dir}", f"max_steps={plan['max_steps']}"]
        run_overrides += [f"checkpoint_every={plan['checkpoint_every']}", "keep_checkpoints=0"]
        if not (run_dir / "final.safetensors").is_file():
            run_training("unet", config_path, run_overrides)
        resolution = load_config(config_path, list(overrides)).task_options.get("resolution", 32)
        params = GenerationRequest(
            steps=sample_steps, cfg_scale=cfg_scale, width=resolution, height=resolution, batch_size=16
        )
        points = evaluate_checkpoints(
            config_path, run_overrides, run_dir, reference, prompts, extractor, params, progress
        )
        floor = first_stage_floor(
            config_path, run_overrides, reference_dir, reference, extractor, out / f"first_stage_f{factor}"
        )
        study["factors"][str(factor)] = {
            "config": str(config_path), "plan": plan, "points": points, "first_stage": floor
        }  # fmt: skip
        _write(study, out)
    return study


@torch.inference_mode()
def first_stage_floor(
    config_path: Path,
    overrides: Sequence[str],
    reference_dir: Path,
    reference: Any,
    extractor: Any,
    out: Path,
) -> dict[str, Any]:
    """The first stage's own limit: FID-CLIP (and precision/recall) of its reconstructions (posterior mean,
    decoded) of the reference images against those images, and their PSNR. A U-Net on its latents cannot
    do much better, so it separates what the autoencoder costs from what the U-Net learned."""
    from PIL import Image

    from latentforge.evaluation.evaluate import evaluate_sets
    from latentforge.pipelines.images import pil_to_tensor
    from latentforge.training import losses

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    vae = make_unet_task(load_config(config_path, list(overrides))).vae.eval()  # as the U-Net saw it
    out.mkdir(parents=True, exist_ok=True)
    psnrs = []
    for path in sorted(reference_dir.glob("*.png")):
        with Image.open(path) as image:
            pixels = pil_to_tensor([image.convert("RGB")])
        recon = vae.decode(vae.encode(pixels).mode()).clamp(-1, 1)
        psnrs.append(losses.psnr(recon, pixels))
        tensor_to_pil(recon)[0].save(out / path.name)
        (out / path.name).with_suffix(".txt").write_text(path.with_suffix(".txt").read_text())
    results, _, _ = evaluate_sets(out, reference, extractor=extractor, metrics=CARD_METRICS, progress=False)
    # mean per-image PSNR, as `latentforge train vae`'s holdout evaluation reports it
    psnr = losses.mean_finite(torch.cat(psnrs), cap=100.0)
    floor = {**results["values"], "psnr": psnr, "images": len(psnrs)}
    (out / "metrics.json").write_text(json.dumps(floor, indent=2) + "\n")
    return floor


def _write(study: dict[str, Any], out: Path) -> None:
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    lines = [
        "| f | Step | Training time (s) | FID-CLIP | CLIP score | Precision | Recall |",
        "|" + " --- |" * 7,
    ]
    for factor, entry in study["factors"].items():
        for p in entry["points"]:
            cells = [f"{p.get(k, math.nan):.4g}" for k in ("fid", "clip_score", "precision", "recall")]
            lines.append(f"| {factor} | {p['step']} | {p['seconds']:.0f} | " + " | ".join(cells) + " |")
    plans = [
        f"- f = {f}: {e['plan']['max_steps']} steps of {e['plan']['batch_size']} images"
        + (
            f" ({e['plan']['step_seconds']:.3f} s/step measured, budget {e['plan']['budget_seconds']:.0f} s)"
            if e["plan"].get("step_seconds")
            else ""
        )
        for f, e in study["factors"].items()
    ]
    floors = [
        "| f | PSNR (dB) | FID-CLIP | Precision | Recall |",
        "|" + " --- |" * 5,
        *(
            f"| {f} | {e['first_stage']['psnr']:.2f} | "
            + " | ".join(f"{e['first_stage'].get(k, math.nan):.4g}" for k in ("fid", "precision", "recall"))
            + " |"
            for f, e in study["factors"].items()
        ),
    ]
    (out / "study.md").write_text(
        "\n".join(
            [
                *lines,
                "",
                *plans,
                "",
                "First stage alone (its reconstructions of the reference images):",
                "",
                *floors,
                "",
                "![FID vs training time](study.png)",
                "",
            ]
        )  # fmt: skip
    )
    plot_study(study, out / "study.png")


def plot_study(study: dict[str, Any], path: Path) -> Path:
    """FID-CLIP against training wall time, or against training images seen in a fixed-steps study, one
    line per downsampling factor (LDM figure 6)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for factor, entry in study["factors"].items():
        points = entry["points"]
        if study.get("steps"):
            x = [p["step"] * entry["plan"]["batch_size"] / 1000 for p in points]
        else:
            x = [p["seconds"] / 60 for p in points]
        (line,) = ax.plot(x, [p.get("fid", math.nan) for p in points], "o-", label=f"f = {factor}")
        if "first_stage" in entry:  # the autoencoder's own FID: the floor of this factor's curve
            ax.axhline(entry["first_stage"]["fid"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel(
        "training images seen (thousands; equal FLOPs per image)"
        if study.get("steps")
        else "training time (CPU wall-clock minutes)"
    )
    ax.set_ylabel("FID-CLIP (lower is better)")
    ax.set_title("Downsampling factor: FID vs training time at equal compute")
    ax.plot([], [], color="grey", linestyle=":", label="first stage alone")
    ax.legend()
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-minutes", type=float, help="training wall time per factor")
    budget.add_argument("--steps", type=int, help="training steps per factor (equal compute, any load)")
    p.add_argument("--features", required=True, help="clip:PATH (our CLIP export) for FID-CLIP")
    p.add_argument("--out", default="runs/study")
    p.add_argument(
        "--factors", default="4,8,1", help="comma-separated f values (configs/default/study_fF.toml)"
    )
    p.add_argument("--evals", type=int, default=6, help="checkpoints evaluated per factor")
    p.add_argument("--images", type=int, default=290, help="generated images per evaluation")
    p.add_argument("--probe-steps", type=int, default=20)
    p.add_argument("--vae-steps", type=int, help="max_steps of the first-stage runs (default: vae.toml's)")
    p.add_argument("--set", action="append", default=[], help="config override for every run, key=value")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    configs = {int(f): study_config(int(f)) for f in args.factors.split(",")}
    run_study(
        configs, args.out, args.budget_minutes and args.budget_minutes * 60, args.features, steps=args.steps,
        overrides=args.set, evals=args.evals,
        images=args.images, probe_steps=args.probe_steps, vae_steps=args.vae_steps,
    )  # fmt: skip
    print(f"wrote {Path(args.out) / 'study.md'} and study.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
