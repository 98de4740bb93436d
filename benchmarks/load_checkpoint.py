"""Peak memory and wall time of loading an SD 1.5-size fp16 `.safetensors`: latentforge vs diffusers.

Usage: python benchmarks/load_checkpoint.py [--checkpoint PATH] [--cases ours-fp16,ours-bf16,...]
       [--repeats 1] [--threads 2]

Each case runs in a fresh subprocess: import everything, note the RSS ("base"), reset the kernel's
peak-RSS counter (`/proc/self/clear_refs`), load, read VmHWM ("peak"). We print peak / file size (the
issue's target: <= 1.3 for an fp16 load of an fp16 file, i.e. never two copies of the weights) and
(peak - base) / file size, the load's own share. diffusers keeps weights memory-mapped (they enter
RSS only when touched), so after the load every tensor is read once ("used": VmHWM after that pass)
and "peak" is the larger of the two. `latentforge.load` runs without the A1111 hash
(`compute_hash=False`; the hash reads the file once more and costs time, not memory). diffusers:
`StableDiffusionPipeline.from_single_file(config=<local folder>, local_files_only=True)`, offline.
The page cache is warm (the file was just written or read), so times are CPU and memcpy, not disk.
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

CASES = ("ours-fp16", "ours-bf16", "ours-fp32", "diffusers-fp16", "diffusers-fp32")
DEFAULT_CHECKPOINT = Path(tempfile.gettempdir()) / "latentforge-bench" / "sd15-random-fp16.safetensors"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(case: str, checkpoint: Path, config: Path, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    impl, dtype_name = case.split("-")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if impl == "ours":
        import latentforge

        def run() -> object:
            return latentforge.load(checkpoint, dtype=dtype, compute_hash=False)
    else:
        from diffusers import StableDiffusionPipeline

        def run() -> object:
            return StableDiffusionPipeline.from_single_file(
                str(checkpoint), config=str(config), local_files_only=True, torch_dtype=dtype
            )

    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    model = run()
    seconds = time.perf_counter() - start
    after, peak = _status_kb("VmRSS"), _status_kb("VmHWM")
    # diffusers leaves the weights memory-mapped: they count once touched, so touch every tensor
    modules = [model.unet, model.vae, model.text_encoder]
    with torch.no_grad():
        for module in modules:
            for tensor in module.state_dict().values():
                tensor.sum()
    used = _status_kb("VmHWM")
    return {"seconds": seconds, "base_kb": base, "peak_kb": peak, "after_kb": after, "used_kb": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    if args.child:
        print(json.dumps(_child(args.child, args.checkpoint, args.config, args.threads)))
        return

    from full_size_roundtrip import write_diffusers_config_folder, write_random_checkpoint

    path = write_random_checkpoint(args.checkpoint)
    size_mb = path.stat().st_size / 2**20
    print(f"checkpoint: {path} ({size_mb:.0f} MiB)")
    columns = ("seconds", "base MiB", "peak MiB", "after MiB", "used MiB", "peak/file", "(peak-base)/file")
    print(f"{'case':<16}" + "".join(f"{c:>{len(c) + 2}}" for c in columns))
    with tempfile.TemporaryDirectory() as tmp:
        config = write_diffusers_config_folder(Path(tmp) / "config")
        for case in args.cases.split(","):
            for _ in range(args.repeats):
                command = [sys.executable, __file__, "--child", case, "--checkpoint", str(path)]
                command += ["--config", str(config), "--threads", str(args.threads)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                r = json.loads(output.strip().splitlines()[-1])
                base, peak, after, used = (r[k] / 1024 for k in ("base_kb", "peak_kb", "after_kb", "used_kb"))
                peak = max(peak, used)
                print(
                    f"{case:<16}{r['seconds']:>9.1f}{base:>10.0f}{peak:>10.0f}{after:>11.0f}{used:>10.0f}"
                    f"{peak / size_mb:>11.2f}{(peak - base) / size_mb:>18.2f}"
                )


if __name__ == "__main__":
    main()
