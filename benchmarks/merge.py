"""Peak memory and time of merging two SD 1.5-size fp16 checkpoints, streamed (ours) vs loading both whole,
and the time to apply / undo a rank-32 LoRA on an SD 1.5-size model.

Usage: python benchmarks/merge.py [--dir /tmp/latentforge-bench] [--cases ours,load-both,lora] [--threads 1]

The two inputs are written once, tensor by tensor, from the shapes of our networks built on `meta` (random
normal values, seeds 0 and 1; SD 1.5's key names and shapes, 1.97 GiB each). Each case runs in a fresh
subprocess: imports, RSS noted ("base"), the kernel's peak-RSS counter reset (`/proc/self/clear_refs`), the
work, then VmHWM ("peak"). Cases:
- ours: `latentforge.merge(out, A, B, alpha=0.5)`, weighted sum, streamed; includes hashing both inputs
  (SHA-256, for the recipe) and the output (while writing);
- load-both: `safetensors.torch.load_file` of A and of B, (1 - a) A + a B per key in place, `save_file`:
  what a merger that holds both models does (A1111's `run_modelmerger` reads both state dicts whole);
- lora: load A as fp16 (`latentforge.load`), apply a rank-32 LoRA on kohya's 264 SD 1.5 modules
  (`checkpoints.lora.apply_loras`), undo it; undo must restore every weight bit for bit.
The page cache is warm (the files were just written or read): times are CPU and memcpy, not disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = ("ours", "load-both", "lora")
DEFAULT_DIR = Path(tempfile.gettempdir()) / "latentforge-bench"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_random_sd15(path: Path, seed: int) -> Path:
    """An SD 1.5-layout fp16 checkpoint of random values, written one tensor at a time (little memory)."""
    if path.is_file():
        return path
    from latentforge.checkpoints.single_file import to_single_file_state_dict
    from latentforge.checkpoints.writing import save_safetensors_streamed
    from latentforge.models.families import SD1
    from latentforge.models.text_encoder import CLIPTextModel
    from latentforge.models.unet import UNetModel
    from latentforge.models.vae import AutoencoderKL

    with torch.device("meta"):
        parts = [m(c).state_dict() for m, c in ((UNetModel, SD1.unet), (AutoencoderKL, SD1.vae),
                                                (CLIPTextModel, SD1.text_encoder))]  # fmt: skip
    shapes = to_single_file_state_dict(*parts, SD1)
    generator = torch.Generator().manual_seed(seed)
    entries = [(k, torch.float16, tuple(v.shape)) for k, v in shapes.items()]

    def produce(key: str) -> torch.Tensor:
        return (torch.randn(shapes[key].shape, generator=generator) * 0.05).half()

    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_streamed(path, entries, produce)
    return path


def write_random_lora(path: Path, rank: int = 32) -> Path:
    if path.is_file():
        return path
    from latentforge.checkpoints.lora_writing import (
        LoraFactors,
        kohya_targets,
        module_shapes,
        save_kohya_lora,
    )
    from latentforge.models.families import SD1

    generator = torch.Generator().manual_seed(2)
    shapes = module_shapes(SD1)
    factors = {}
    for name in kohya_targets(SD1):
        shape = shapes[name]
        down = torch.randn(rank, *shape[1:], generator=generator) * 0.01
        up = torch.randn(shape[0], rank, *(1,) * (len(shape) - 2), generator=generator) * 0.01
        factors[name] = LoraFactors(down, up, rank / 2)
    save_kohya_lora(path, factors, SD1, dtype=torch.float16)
    return path


def _child(case: str, folder: Path, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    a, b = folder / "sd15-random-a.safetensors", folder / "sd15-random-b.safetensors"
    out = folder / f"merged-{case}.safetensors"
    result: dict[str, float] = {}
    if case == "ours":
        import latentforge

        def run() -> None:
            latentforge.merge(out, a, b, alpha=0.5, overwrite=True)
    elif case == "load-both":
        from safetensors.torch import load_file, save_file

        def run() -> None:
            theta_0, theta_1 = load_file(a), load_file(b)
            for key, value in theta_0.items():
                if "model" in key and key in theta_1:
                    theta_0[key] = (0.5 * value.float() + 0.5 * theta_1[key].float()).half()
            save_file(theta_0, out)
    else:
        import latentforge
        from latentforge.checkpoints.lora import apply_loras

        lora = folder / "sd15-random-lora-r32.safetensors"
        model = latentforge.load(a, dtype=torch.float16, compute_hash=False)
        before = {k: v.clone() for k, v in model.unet.state_dict().items()}

        def run() -> None:
            start = time.perf_counter()
            handle = apply_loras(model, [(lora, 1.0, None)])
            result["apply_s"] = time.perf_counter() - start
            start = time.perf_counter()
            handle.undo()
            result["undo_s"] = time.perf_counter() - start
            result["bit_exact"] = float(
                all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
            )

    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    if out.exists():
        out.unlink()
    return {**result, "seconds": seconds, "base_kb": base, "peak_kb": _status_kb("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.dir, args.threads)))
        return
    start = time.perf_counter()
    a = write_random_sd15(args.dir / "sd15-random-a.safetensors", 0)
    write_random_sd15(args.dir / "sd15-random-b.safetensors", 1)
    write_random_lora(args.dir / "sd15-random-lora-r32.safetensors")
    size = a.stat().st_size / 2**20
    written = time.perf_counter() - start
    print(f"inputs: 2 x {size:.0f} MiB fp16 ({written:.0f} s to write), threads {args.threads}")
    print(
        f"{'case':<10}{'seconds':>9}{'base MiB':>10}{'peak MiB':>10}{'(peak-base)/file':>18}{'peak/file':>11}"
    )
    for case in args.cases.split(","):
        command = [
            sys.executable,
            __file__,
            "--child",
            case,
            "--dir",
            str(args.dir),
            "--threads",
            str(args.threads),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(output.strip().splitlines()[-1])
        base, peak = r["base_kb"] / 1024, r["peak_kb"] / 1024
        line = f"{case:<10}{r['seconds']:>9.1f}{base:>10.0f}{peak:>10.0f}"
        line += f"{(peak - base) / size:>18.2f}{peak / size:>11.2f}"
        if case == "lora":
            line += f"   apply {r['apply_s']:.2f} s, undo {r['undo_s']:.2f} s"
            line += f", undo bit-exact: {bool(r['bit_exact'])}"
        print(line)


if __name__ == "__main__":
    main()
