"""Eager torch (fp32, bf16) against the openvino backend, in one run.

    python benchmarks/backend.py [--runs 20] [--threads 1,2] [--sd-repeats 3] [--skip-sd15]

1. The embedded default model end to end (64 px, 20 steps DPM++ 2M, CFG 7, batch 1, `run`): median and
   min wall seconds and median CPU seconds of --runs runs after one warm-up, per implementation and thread
   count. The openvino rows load the fp32 checkpoint with `backend="openvino"` (bf16 inference on CPUs with
   native bf16); its first call's conversion is reported separately: export + convert into a fresh cache
   dir, then (the next process) the read of the cached graph + compile.
2. One SD1.5-size U-Net step at 512 px (latents 64x64, batch 2 = cond + uncond, 77 tokens), bf16 random
   weights built on `meta` and filled in bf16 (no fp32 copy): median seconds per step of --sd-repeats after
   a warm-up, conversion seconds, and peak RSS (VmHWM after resetting it with /proc/self/clear_refs, i.e.
   weights + conversion + compiled model + activations; "before" is the RSS with the weights only).

Every (case, implementation, threads) runs in its own subprocess (peak RSS its own, OMP_NUM_THREADS set
to its thread count; with 2 threads OMP_WAIT_POLICY=PASSIVE so that idle OpenMP threads sleep instead of
spinning on a shared machine) and prints one JSON line; the parent prints the tables and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("eager-fp32", "eager-bf16", "openvino")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def default_case(impl: str, runs: int, cache_dir: str) -> dict:
    import torch

    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    dtype = torch.bfloat16 if impl == "eager-bf16" else torch.float32
    backend = "openvino" if impl == "openvino" else "torch"
    model = load(default_model_path(), dtype=dtype, backend=backend, backend_cache_dir=cache_dir)
    request = GenerationRequest(prompt="a smiling yellow face", steps=20, seed=1)
    start = time.perf_counter()
    first = run(model, request, progress=False)[0].image  # warm-up (openvino: converts or reads + compiles)
    first_seconds = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        run(model, request, progress=False)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    first.save(Path(cache_dir).parent / f"default-{impl}-{torch.get_num_threads()}.png")
    seconds = dict(model.backend.seconds) if model.backend is not None else {}
    return {
        "wall": statistics.median(wall),
        "wall_min": min(wall),
        "cpu": statistics.median(cpu),
        "first": first_seconds,
        "backend": seconds,
        "precision": getattr(model.backend, "precision", str(dtype).removeprefix("torch.")),
    }


def sd15_case(impl: str, repeats: int, cache_dir: str) -> dict:
    import torch

    from latentforge.backends import OpenVINOBackend
    from latentforge.models.families import SD1
    from latentforge.models.unet import UNetModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNetModel(SD1.unet).to(torch.bfloat16)
    unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            torch.nn.init.normal_(p, std=0.02)
    unet.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, SD1.unet.context_dim, generator=g)
    before = _status_kib("VmRSS")
    _reset_peak()
    if impl == "openvino":
        runner = OpenVINOBackend(unet, cache_dir=cache_dir)

        def step() -> torch.Tensor:
            return runner.unet(x, t, context)
    else:

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return unet(x.bfloat16(), t, context.bfloat16()).float()

    start = time.perf_counter()
    step()  # warm-up (openvino: export + convert + compile)
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {
        "wall": statistics.median(wall),
        "wall_min": min(wall),
        "cpu": statistics.median(cpu),
        "first": first,
        "backend": dict(runner.seconds) if impl == "openvino" else {},
        "rss_before_gib": before / 2**20,
        "peak_gib": _status_kib("VmHWM") / 2**20,
    }


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.child_threads)
    if args.case == "default":
        result = default_case(args.impl, args.runs, args.cache_dir)
    else:
        result = sd15_case(args.impl, args.sd_repeats, args.cache_dir)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(args: argparse.Namespace, case: str, impl: str, threads: int, cache_dir: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if threads > 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, __file__, "--case", case, "--impl", impl, "--child-threads", str(threads)]
    command += ["--runs", str(args.runs), "--sd-repeats", str(args.sd_repeats), "--cache-dir", cache_dir]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{case} {impl} {threads} failed")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"  {case} {impl} threads {threads}: {result}", flush=True)
    return result


def _convert(seconds: dict) -> str:
    fresh = seconds.get("export", 0) + seconds.get("convert", 0)
    if fresh:
        steps = ("export", "convert", "compile")
        return " + ".join(f"{name} {seconds[name]:.1f}" for name in steps) + " s"
    return f"cached: read {seconds.get('read', 0):.2f} + compile {seconds.get('compile', 0):.1f} s"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--sd-repeats", type=int, default=3)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--case", choices=["default", "sd15"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        _child(args)
        return
    threads = [int(n) for n in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="latentforge-backend-bench-") as root:
        cache = str(Path(root) / "cache")  # fresh: the first openvino process converts, later ones read
        if not args.skip_default:
            print(f"default model, 64 px, 20 steps DPM++ 2M, CFG 7, batch 1; {args.runs} runs each")
            rows = {(impl, n): _spawn(args, "default", impl, n, cache) for n in threads for impl in IMPLS}
            print("\n| threads | impl | precision | wall s median (min) | CPU s | eager bf16 / this |")
            print("|---|---|---|---|---|---|")
            for (impl, n), r in rows.items():
                ratio = rows[("eager-bf16", n)]["wall"] / r["wall"]
                print(f"| {n} | {impl} | {r['precision']} | {r['wall']:.3f} ({r['wall_min']:.3f}) | "
                      f"{r['cpu']:.3f} | {ratio:.2f}x |")  # fmt: skip
            for (impl, n), r in rows.items():
                if impl == "openvino":
                    print(f"openvino first call, threads {n}: {r['first']:.1f} s ({_convert(r['backend'])})")
        if not args.skip_sd15:
            print("\nSD1.5-size U-Net, one step at 512 px (latents 2x4x64x64), bf16 random weights")
            impls = ("eager-bf16", "openvino")
            sd15 = {impl: _spawn(args, "sd15", impl, threads[-1], cache) for impl in impls}
            print("\n| impl | step s median (min) | CPU s | weights GiB | peak RSS GiB | first call |")
            print("|---|---|---|---|---|---|")
            for impl, r in sd15.items():
                first = _convert(r["backend"]) if r["backend"] else f"{r['first']:.1f} s"
                print(f"| {impl} | {r['wall']:.2f} ({r['wall_min']:.2f}) | {r['cpu']:.2f} | "
                      f"{r['rss_before_gib']:.2f} | {r['peak_gib']:.2f} | {first} |")  # fmt: skip
            ratio = sd15["eager-bf16"]["wall"] / sd15["openvino"]["wall"]
            print(f"openvino / eager bf16 step speed: {ratio:.2f}x (threads {threads[-1]})")


if __name__ == "__main__":
    main()
