"""One SDXL-size U-Net step at 1024x1024 (latent 128x128), ours vs diffusers, random weights in bf16.

Usage: python benchmarks/sdxl.py [--family sdxl-base|sdxl-refiner|tiny-sdxl] [--size 1024] [--threads 2]
       [--dtype bf16] [--steps 1]
       python benchmarks/sdxl.py --family sdxl-base --write-checkpoint PATH  (then load_checkpoint.py)
       python benchmarks/sdxl.py --end-to-end [--size 1024] [--steps 2] [--dtype bf16]  (peak RSS of txt2img)

Each implementation runs in a fresh subprocess that builds only its model directly in the dtype (on
`meta`, then `to_empty` and a random normal fill, std 0.02; the two sides hold different random weights,
which does not change the work), runs `--steps` U-Net forwards (CFG batch 2: cond and uncond, as a
sampling step) under `torch.inference_mode`, and reports wall-clock and process CPU seconds per step
(CPU seconds are steadier when other jobs share the cores) and the peak RSS (VmHWM, the
kernel's high-water mark of resident memory) of the whole process: weights, activations and imports.
Inputs: x [2, 4, s/8, s/8], t = 500, context [2, 77, context_dim], the `vector` [2, adm_in_channels].

`--end-to-end` (ours only; memory, not speed): the whole full-size model (U-Net, both text encoders, VAE)
built on `meta` and filled at random directly in the dtype, then one txt2img through the runner (prompt
and negative through both encoders, `--steps` Euler steps with CFG, VAE decode) at `--size`, in the same
process. Reports the weights' size, the RSS after building, the RSS at each sampling step, and the peak
RSS (VmHWM) of the whole run, with what the run used: SDPA attention, tiled VAE or not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from latentforge.checkpoints.keymap_unet import diffusers_config
from latentforge.models.families import get_family
from latentforge.models.unet import UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(kind: str, family_name: str, dtype: torch.dtype) -> torch.nn.Module:
    config = get_family(family_name).unet
    with torch.device("meta"):
        if kind == "ours":
            model: torch.nn.Module = UNetModel(config)
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**diffusers_config(config))
    model = model.to(dtype).to_empty(device="cpu")  # dtype first: no fp32 copy of the weights
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    return model.eval()


def child(kind: str, family_name: str, size: int, dtype_name: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    config = get_family(family_name).unet
    built = time.perf_counter()
    model = _build(kind, family_name, dtype)
    built = time.perf_counter() - built
    latent = size // 8
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, latent, latent, generator=generator).to(dtype)
    context = torch.randn(2, 77, config.context_dim, generator=generator).to(dtype)
    vector = torch.randn(2, config.adm_in_channels, generator=generator).to(dtype)
    t = torch.full((2,), 500.0)
    times, cpu_times = [], []
    with torch.inference_mode():
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            if kind == "ours":
                out = model(x, t, context, vector)
            else:  # diffusers splits the vector into pooled text and the numbers; the work is the same
                inputs = get_family(family_name).vector_inputs
                count = 2 * len(inputs) - ("aesthetic_score" in inputs)
                pooled_dim = config.adm_in_channels - count * config.vector_embed_dim
                added = {"text_embeds": vector[:, :pooled_dim], "time_ids": torch.full((2, count), 1024.0)}
                out = model(x, t, context, added_cond_kwargs=added).sample
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    assert torch.isfinite(out.float()).all()
    return {
        "impl": kind,
        "family": family_name,
        "size": size,
        "dtype": dtype_name,
        "threads": threads,
        "build_s": round(built, 1),
        "s_per_step": [round(v, 2) for v in times],
        "cpu_s_per_step": [round(v, 2) for v in cpu_times],  # steadier than wall-clock on a shared machine
        "peak_rss_mib": round(_peak_rss_mib()),
    }


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def end_to_end(family_name: str, size: int, dtype_name: str, steps: int, threads: int) -> dict:
    """Peak RSS of one txt2img of the full-size family at `size` (see the module docstring)."""
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = _random_bundle(family_name, DTYPES[dtype_name])
    weights = {
        name: sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")
        if (module := getattr(model, name)) is not None
    }
    built = {"s": round(time.perf_counter() - start), "rss_mib": round(_rss_mib())}
    request = GenerationRequest(
        prompt="a lighthouse on a cliff at dusk, oil painting",
        negative_prompt="blurry",
        width=size,
        height=size,
        steps=steps,
        sampler="Euler",
        seed=1,
    )
    step_rss: list[int] = []
    start = time.perf_counter()
    (result,) = run(model, request, progress=False, callback=lambda info: step_rss.append(round(_rss_mib())))
    return {
        "impl": "ours end-to-end",
        "family": family_name,
        "size": size,
        "dtype": dtype_name,
        "steps": steps,
        "threads": threads,
        "weights_mib": {k: round(v) for k, v in weights.items()},
        "weights_total_mib": round(sum(weights.values())),
        "after_build": built,
        "rss_mib_at_steps": step_rss,
        "tiled_vae": request.use_tiled_vae(size, size),
        "attention": "torch scaled_dot_product_attention",
        "generate_s": round(time.perf_counter() - start),
        "image": list(result.image.size),
        "peak_rss_mib": round(_peak_rss_mib()),
    }


def _random_bundle(family_name: str, dtype: torch.dtype):  # noqa: ANN202 (StableDiffusion)
    """The full-size family built on `meta` and filled with N(0, 0.02) directly in `dtype`."""
    from latentforge.checkpoints.assembly import SkipInitOnMeta
    from latentforge.model import StableDiffusion

    with SkipInitOnMeta():
        bundle = StableDiffusion.from_family(get_family(family_name), dtype=dtype, device="meta")
    generator = torch.Generator().manual_seed(0)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(bundle, name)
        if module is None:
            continue
        module = module.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator).mul_(0.02))
        setattr(bundle, name, module.eval())
    return bundle


def write_checkpoint(path: Path, family_name: str, dtype: torch.dtype = torch.float16) -> Path:
    """A random-weight single file of the family (sgm layout), built directly in `dtype`: for
    `benchmarks/load_checkpoint.py --checkpoint PATH --cases ours-fp16,ours-bf16` (peak RSS of loading)."""
    from latentforge.checkpoints.single_file import save_single_file

    family = get_family(family_name)
    bundle = _random_bundle(family_name, dtype)
    sds = {
        name: module.state_dict()
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if (module := getattr(bundle, name)) is not None
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(
        path, sds["unet"], sds["vae"], sds["text_encoder"], family, text_encoder_2=sds.get("text_encoder_2")
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl-base")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)  # the child
    parser.add_argument("--write-checkpoint", type=Path, help="write a random fp16 single file and exit")
    parser.add_argument("--end-to-end", action="store_true", help="peak RSS of one full txt2img (ours)")
    args = parser.parse_args()
    if args.end_to_end:
        print(json.dumps(end_to_end(args.family, args.size, args.dtype, args.steps, args.threads)))
        return
    if args.write_checkpoint:
        print(write_checkpoint(args.write_checkpoint, args.family))
        return
    if args.impl:
        print(json.dumps(child(args.impl, args.family, args.size, args.dtype, args.steps, args.threads)))
        return
    for impl in ("ours", "diffusers"):
        command = [sys.executable, __file__, "--impl", impl, *sys.argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            print(f"{impl}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
