"""txt2img end to end, ours vs diffusers' StableDiffusionPipeline: seconds and peak memory.

An SD1.5-size model with random weights (each side draws its own from seed 0, in memory, no file: the
values do not change the time; benchmarks/deepcache.py shares ours through the key maps), 512x512, 20 steps
of DPM++ 2M with Karras sigmas, CFG 7, batch 1.
Each (implementation, dtype, case) runs in its own subprocess so peak RSS is its own; the peak is reset
(`/proc/self/clear_refs`) after the model is built, so "peak" is weights + inference, not set-up.

    python benchmarks/txt2img.py --dtypes fp32,bf16 --size 512 --steps 20

Cases (`--cases`, the speed options of docs/performance.md, each against diffusers' equivalent):
    plain     the above
    cutoff    + CFG cut-off 0.5 (ours `cfg_cutoff`; diffusers' SDCFGCutoffCallback, cutoff_step_ratio 0.5)
    tome      + ToMe ratio 0.5, max downsample 1 (ours; diffusers + tomesd.apply_patch)
    lcm-taesd LCM sampler, 4 steps, CFG 1, decoded by TAESD (random full-size weights on both sides;
              diffusers' LCMScheduler + AutoencoderTiny)
    cutoff-deepcache  CFG cut-off 0.5 + DeepCache (`--deepcache-interval`, `--deepcache-branch`; diffusers'
              SDCFGCutoffCallback + the `deepcache` package's DeepCacheSDHelper)
    int8      ours with int8 U-Net weights (`latentforge generate --int8`), against diffusers' plain run
`--run-steps K` samples only K steps and scales: seconds(N steps) = total - sampling + sum over the N
steps of the measured time of a step of that kind (guided or cond-only; with DeepCache also full or
cached), so short runs give the N-step number (the time of a U-Net call of one kind is constant across
steps). Every kind of the N-step run must occur among steps 1..K-1 of the short one (step 0 also holds
the set-up): K = 6 does for cutoff-deepcache at interval 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_ours(dtype, *, int8: bool = False):  # noqa: ANN001, ANN201
    """SD1.5 size, random N(0, 0.02) weights, materialised in `dtype` directly: no fp32 copy is ever held.
    `int8`: the U-Net's quantizable layers are made int8 on `meta` first and each is filled by quantizing
    a float tensor of its own, one layer at a time (the float U-Net never exists whole, as in an int8 load).
    """
    import torch

    from latentforge.model import StableDiffusion
    from latentforge.models.families import SD1
    from latentforge.models.quantize import Int8Conv2d, Int8Linear, quantize_int8, quantize_per_channel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = StableDiffusion.from_family(SD1, dtype=dtype, device="meta")
    if int8:
        quantize_int8(model.unet)
    for module in (model.unet, model.vae, model.text_encoder):
        module.to_empty(device="cpu")
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        for layer in module.modules():
            if isinstance(layer, Int8Linear | Int8Conv2d):
                q, scale = quantize_per_channel(torch.empty_like(layer.weight, dtype=dtype).normal_(std=0.02))
                layer.weight.copy_(q)
                layer.weight_scale.copy_(scale)
    return model.eval()


PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
CUTOFF, TOME = 0.5, 0.5
CASES = ("plain", "cutoff", "tome", "lcm-taesd", "cutoff-deepcache", "int8")
Kind = tuple[bool, bool]  # (guided, full U-Net evaluation) of one step


def case_steps(case: str, steps: int, interval: int = 1) -> tuple[int, list[Kind]]:
    """(steps, kind of each step) of a case at `steps` steps (LCM: always 4, unguided)."""
    if case == "lcm-taesd":
        return 4, [(False, True)] * 4
    # diffusers' SDCFGCutoffCallback (and our cfg_cutoff): steps after int(n * ratio) are unguided
    guided = [i <= int(steps * CUTOFF) or "cutoff" not in case for i in range(steps)]
    # DeepCache's uniform schedule: evaluation i is full when i % interval == 0 (one call per DPM++ 2M step)
    full = [i % interval == 0 or case != "cutoff-deepcache" for i in range(steps)]
    return steps, list(zip(guided, full, strict=True))


def scaled_seconds(
    total: float, marks: list[float], start: float, short: list[Kind], full: list[Kind]
) -> float:
    """Seconds of the full run from a short one: fixed part + the median step time of each kind."""
    durations = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)]
    kinds: dict[Kind, list[float]] = {}
    for i, (d, kind) in enumerate(zip(durations, short, strict=True)):
        if i > 0 or len(durations) == 1:  # the first interval also holds the set-up before sampling
            kinds.setdefault(kind, []).append(d)
    median = {k: sorted(v)[len(v) // 2] for k, v in kinds.items()}
    if short == full:
        return total
    if not set(full) <= set(median):
        raise SystemExit(f"--run-steps too short: step kinds {sorted(set(full) - set(median))} not measured")
    return total - sum(median[k] for k in short) + sum(median[k] for k in full)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def scaled(
    start: tuple[float, float], end: tuple[float, float], marks: list[tuple[float, float]], short: list[Kind],
    full: list[Kind],
) -> dict:  # fmt: skip
    """Wall and CPU seconds of the full run (CPU time: all threads; robust to other load on the machine)."""
    out: dict = {"run_steps": len(short)}
    for j, name in ((0, "seconds"), (1, "cpu_seconds")):
        times = [m[j] for m in marks]
        out[name] = scaled_seconds(end[j] - start[j], times, start[j], short, full)
        out["measured_" + name] = end[j] - start[j]
    return out


def run_ours(args: argparse.Namespace, dtype) -> dict:  # noqa: ANN001
    import torch

    from latentforge.models.taesd import TAESD, TinyAutoencoder
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    model = build_ours(dtype, int8=args.case == "int8")
    n, full = case_steps(args.case, args.steps, args.deepcache_interval)
    k, short = case_steps(args.case, min(args.run_steps or n, n), args.deepcache_interval)
    options: dict = {"sampler": "DPM++ 2M", "schedule": "Karras", "cfg_scale": 7.0}
    if "cutoff" in args.case:
        options["cfg_cutoff"] = CUTOFF
    if args.case == "cutoff-deepcache":
        options.update(deepcache_interval=args.deepcache_interval, deepcache_branch=args.deepcache_branch)
    if args.case == "tome":
        options["token_merging_ratio"] = TOME
    if args.case == "lcm-taesd":
        torch.manual_seed(0)
        model.taesd = TinyAutoencoder(TAESD, encoder=False).to(dtype).eval()
        options = {"sampler": "LCM", "schedule": "Automatic", "cfg_scale": 1.0, "fast_decode": True}
    params = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, steps=k, seed=1, width=args.size, height=args.size, **options
    )
    run(model, GenerationRequest(prompt="warm-up", steps=1, width=64, height=64), progress=False)
    reset_peak()
    marks: list[tuple[float, float]] = []
    start = clocks()
    run(model, params, progress=False, callback=lambda info: marks.append(clocks()) and None)
    return scaled(start, clocks(), marks, short, full)


def cond_rows(value):  # noqa: ANN001, ANN201
    """The conditional (last) half of every batch-2 tensor in a nested tuple (diffusers: [uncond, cond])."""
    if isinstance(value, tuple | list):
        return type(value)(cond_rows(v) for v in value)
    if hasattr(value, "shape") and value.shape[0] == 2:
        return value[1:]
    return value


def run_diffusers(args: argparse.Namespace, dtype) -> dict:  # noqa: ANN001
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        DPMSolverMultistepScheduler,
        LCMScheduler,
        StableDiffusionPipeline,
    )
    from diffusers import UNet2DConditionModel as DUNet
    from diffusers.callbacks import SDCFGCutoffCallback
    from transformers import CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from latentforge.checkpoints.keymap_unet import diffusers_config
    from latentforge.models.families import SD1
    from references import diffusers_vae_config, transformers_text_config, write_hf_clip_vocab

    torch.manual_seed(0)
    unet = DUNet(**diffusers_config(SD1.unet)).to(dtype)
    vae = AutoencoderKL(**diffusers_vae_config(SD1.vae), scaling_factor=SD1.latent_scale).to(dtype)
    text = CLIPTextModel(transformers_text_config(SD1.text_encoder)).to(dtype)
    folder = write_hf_clip_vocab(Path(tempfile.mkdtemp()))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="<|endoftext|>")
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    scheduler = DPMSolverMultistepScheduler(**betas, use_karras_sigmas=True)
    n, full = case_steps(args.case, args.steps, args.deepcache_interval)
    k, short = case_steps(args.case, min(args.run_steps or n, n), args.deepcache_interval)
    guidance = 7.0
    if args.case == "lcm-taesd":
        scheduler, guidance = LCMScheduler(**betas), 1.0
        vae = AutoencoderTiny().to(dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe("warm-up", num_inference_steps=1, height=64, width=64)
    if args.case == "tome":
        import tomesd

        tomesd.apply_patch(pipe, ratio=TOME)
    helper = None
    if args.case == "cutoff-deepcache":
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=args.deepcache_interval, cache_branch_id=args.deepcache_branch)
        helper.enable()
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=CUTOFF) if "cutoff" in args.case else None
    marks: list[tuple[float, float]] = []

    def on_step_end(pipeline, i, t, kwargs):  # noqa: ANN001, ANN202
        marks.append(clocks())
        if cutoff is None:
            return kwargs
        out = cutoff(pipeline, i, t, kwargs)
        if helper is not None and out["prompt_embeds"].shape[0] < kwargs_batch[0]:
            # the batch drops from [uncond, cond] to [cond]: the helper's kept features must follow (it
            # would concatenate batch-2 features with batch-1 skips); ours keeps the cond rows likewise
            helper.cached_output = {key: cond_rows(v) for key, v in helper.cached_output.items()}
        kwargs_batch[0] = out["prompt_embeds"].shape[0]
        return out

    kwargs_batch = [2]

    reset_peak()
    start = (time.perf_counter(), time.process_time())
    with torch.inference_mode():
        pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=k,
            guidance_scale=guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(1),
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        )
    return scaled(start, clocks(), marks, short, full)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    result = (run_ours if args.impl == "ours" else run_diffusers)(args, dtype)
    result.update(peak_mib=rss_mib("VmHWM"), impl=args.impl, dtype=args.dtype, case=args.case)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="plain", help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument(
        "--run-steps", type=int, default=0, help="sample only this many steps and scale (0: all)"
    )
    parser.add_argument("--deepcache-interval", type=int, default=2)
    parser.add_argument("--deepcache-branch", type=int, default=0)
    parser.add_argument("--case", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        child(args)
        return
    rows = []
    for case in args.cases.split(","):
        for dtype in args.dtypes.split(","):
            for impl in ("ours", "diffusers"):
                if (case, impl) == ("int8", "diffusers") and any(
                    (r["case"], r["dtype"], r["impl"]) == ("plain", dtype, "diffusers") for r in rows
                ):
                    continue  # int8 is ours only: its reference is diffusers' plain run, already measured
                command = [sys.executable, __file__, "--impl", impl, "--dtype", dtype, "--case", case]
                command += [
                    "--size",
                    str(args.size),
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                ]
                command += [
                    "--run-steps",
                    str(args.run_steps),
                    "--deepcache-interval",
                    str(args.deepcache_interval),
                ]
                command += ["--deepcache-branch", str(args.deepcache_branch)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{impl} {case} {dtype} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
                print(rows[-1], flush=True)
    print(
        "\n| case | dtype | impl | steps | seconds | CPU s | peak RSS GiB | steps run | ours/diffusers CPU "
        "| / diffusers plain CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = (r["dtype"], "diffusers")
        theirs = next((x for x in rows if (x["case"], x["dtype"], x["impl"]) == (r["case"], *key)), None)
        plain = next((x for x in rows if (x["case"], x["dtype"], x["impl"]) == ("plain", *key)), None)
        theirs = theirs or (plain if r["case"] == "int8" else None)
        steps = case_steps(r["case"], args.steps)[0]
        versus = f"{r['cpu_seconds'] / theirs['cpu_seconds']:.2f}" if theirs and r["impl"] == "ours" else ""
        versus_plain = f"{r['cpu_seconds'] / plain['cpu_seconds']:.2f}" if plain else ""
        print(
            f"| {r['case']} | {r['dtype']} | {r['impl']} | {steps} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | {r['peak_mib'] / 1024:.2f} | {r['run_steps']} | {versus} | "
            f"{versus_plain} |"
        )


if __name__ == "__main__":
    main()
