"""One U-Net step, ours vs diffusers' UNet2DConditionModel: seconds, GFLOP/s and peak memory.

Usage: python benchmarks/unet_step.py [--config sd1|sd2|tiny] [--sizes 32,64] [--dtypes fp32,bf16]
       [--repeats 5] [--threads N] [--batch 2] [--no-memory]

Time: both models are built once in this process with the same random weights (diffusers' init; ours
is built on `meta` and assigned diffusers' tensors through the keymap, so both compute the same
function). Per size and dtype, one warm-up step each, then `--repeats` interleaved steps under
`torch.inference_mode`; we print the median (and min) wall-clock seconds per step and ours/diffusers,
plus the median process CPU seconds (steadier than wall-clock when other jobs share the cores).
FLOPs come from `torch.utils.flop_counter` on a `meta` copy of our model (convolutions, linears,
attention matmuls; elementwise ops are not counted), so GFLOP/s is the same work over each time.

Memory: one fresh subprocess per (implementation, size, dtype) builds only that model, directly in
the dtype (on `meta`, then `to_empty` and a random fill), resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs`), runs two steps and reads VmHWM. "peak" is that peak RSS; "step"
is peak minus the RSS before the first step: activations, workspaces and one-off caches, without the
import and weight memory (diffusers' imports alone cost more). Without clear_refs, ru_maxrss is used.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentforge.checkpoints.keymap_unet import diffusers_config, diffusers_to_ours
from latentforge.models.configs import UNetConfig
from latentforge.models.families import SD1_UNET, SD2_UNET
from latentforge.models.unet import UNetModel

CONFIGS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "tiny": UNetConfig()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTEXT_TOKENS = 77


def _inputs(config: UNetConfig, size: int, batch: int, dtype: torch.dtype, device: str = "cpu"):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, size, size, generator=generator).to(device, dtype)
    context = torch.randn(batch, CONTEXT_TOKENS, config.context_dim, generator=generator).to(device, dtype)
    return x, torch.full((batch,), 500.0, device=device), context


def _flops(config: UNetConfig, size: int, batch: int) -> int:
    with torch.device("meta"):
        model = UNetModel(config)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*_inputs(config, size, batch, torch.float32, device="meta"))
    return counter.get_total_flops()


def _build(kind: str, config: UNetConfig, dtype: torch.dtype) -> torch.nn.Module:
    """A model with random weights, allocated once in `dtype` (for the memory subprocesses)."""
    with torch.device("meta"):
        if kind == "ours":
            model: torch.nn.Module = UNetModel(config)
        else:
            from diffusers import UNet2DConditionModel  # imported only here: its imports cost RSS

            model = UNet2DConditionModel(**diffusers_config(config))
    model = model.to(dtype).to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            bound = parameter[0].numel() ** -0.5 if parameter.ndim > 1 else 1.0
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 * bound - bound)
    return model


def _diffusers_step(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return model(*inputs).sample


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config, dtype = CONFIGS[args.config], DTYPES[args.dtypes]
    model = _build(args.child, config, dtype)
    inputs = _inputs(config, int(args.sizes), args.batch, dtype)

    run = model if args.child == "ours" else functools.partial(_diffusers_step, model)
    with torch.inference_mode():
        before = _rss_mb()
        exact = _reset_peak()
        for _ in range(2):  # the first step also allocates one-off caches; malloc may keep freed memory
            run(*inputs)
        peak = _peak_rss_mb()
    print(json.dumps({"peak": peak, "step": peak - before, "exact": exact}))


def _memory(args: argparse.Namespace, kind: str, size: int, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--config", args.config, "--sizes", str(size)]
    command += ["--dtypes", dtype, "--threads", str(args.threads), "--batch", str(args.batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd1")
    parser.add_argument("--sizes", default="32,64", help="latent sides, comma-separated (64 = 512 px)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=2, help="2 = one classifier-free-guidance step")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**diffusers_config(config)).eval()
    with torch.device("meta"):
        ours = UNetModel(config).eval()
    ours.load_state_dict(diffusers_to_ours(reference.state_dict(), config), assign=True)
    print(f"config {args.config}, batch {args.batch}, threads {args.threads}, repeats {args.repeats}")
    header = f"{'size':>5} {'dtype':>5} {'ours s':>9} {'diff s':>9} {'ratio':>6} {'ours GF/s':>9} "
    header += f"{'diff GF/s':>9} {'rel err':>8} {'ours MB peak/step':>18} {'diff MB peak/step':>18}"
    print(header)
    exact = True
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        ours.to(dtype)
        reference.to(dtype)
        for size in sizes:
            inputs = _inputs(config, size, args.batch, dtype)
            steps = {
                "ours": functools.partial(ours, *inputs),
                "diffusers": functools.partial(_diffusers_step, reference, *inputs),
            }
            times: dict[str, list[float]] = {name: [] for name in steps}
            cpu: dict[str, list[float]] = {name: [] for name in steps}
            with torch.inference_mode():
                expected = steps["diffusers"]().float()
                error = (steps["ours"]().float() - expected).abs().max() / expected.abs().max()
                for _ in range(args.repeats):
                    for name, step in steps.items():
                        start, start_cpu = time.perf_counter(), time.process_time()
                        step()
                        times[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
            median = {name: statistics.median(t) for name, t in times.items()}
            gflop = _flops(config, size, args.batch) / 1e9
            memory = {}
            for name in steps:
                if args.no_memory:
                    memory[name] = "-"
                else:
                    m = _memory(args, name, size, dtype_name)
                    memory[name] = f"{m['peak']:.0f}/{m['step']:.0f}" + ("" if m["exact"] else "*")
                    exact = exact and m["exact"]
            print(
                f"{size:>5} {dtype_name:>5} {median['ours']:>9.4f} {median['diffusers']:>9.4f} "
                f"{median['ours'] / median['diffusers']:>6.3f} {gflop / median['ours']:>9.1f} "
                f"{gflop / median['diffusers']:>9.1f} {error.item():>8.1e} {memory['ours']:>18} "
                f"{memory['diffusers']:>18}"
            )
            mins = {name: min(t) for name, t in times.items()}
            cpu_median = {name: statistics.median(t) for name, t in cpu.items()}
            print(
                f"{'':>11} min {mins['ours']:.4f} / {mins['diffusers']:.4f} s; CPU "
                f"{cpu_median['ours']:.4f} / {cpu_median['diffusers']:.4f} s "
                f"(ratio {cpu_median['ours'] / cpu_median['diffusers']:.3f}); {gflop:.1f} GFLOP per step"
            )
    if not exact:
        print("* peak-RSS reset unavailable: step memory is from ru_maxrss and may be underestimated")


if __name__ == "__main__":
    main()
