"""SD1.5-size VAE decode alone: plain vs banded (models/vae_banded.py), CPU time and peak RSS rise.

Random weights in the given dtype, channels-last latents as `decode_latents` passes them, one process
per mode (the peak is the process's VmHWM, reset after the weights are built and a small warm-up).

    OMP_NUM_THREADS=1 python benchmarks/vae_decode.py --size 1024 --mode plain
    OMP_NUM_THREADS=1 python benchmarks/vae_decode.py --size 1024 --mode banded
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from latentforge.models.families import SD1
from latentforge.models.vae import AutoencoderKL
from latentforge.models.vae_banded import decode_banded


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--mode", choices=["plain", "banded"], default="banded")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    vae = AutoencoderKL(SD1.vae).to(dtype).eval()
    f = SD1.vae.downsampling_factor
    decode = vae.decode if args.mode == "plain" else lambda z: decode_banded(vae, z)

    def latent(size: int) -> torch.Tensor:
        shape = (1, SD1.vae.embed_dim, size // f, size // f)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        return z.to(dtype).contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        decode(latent(64))  # warm-up
        z = latent(args.size)
        Path("/proc/self/clear_refs").write_text("5")  # peak := current RSS
        before = status_mib("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        decode(z)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rise = status_mib("VmHWM") - before
    print(f"| {args.size} px | {args.dtype} | {args.mode} | {rise:.0f} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
