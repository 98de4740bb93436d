"""The embedded default model end to end (64 px, 20 steps DPM++ 2M, CFG 7, batch 1): median wall and CPU
seconds of N runs, and where the time goes (U-Net forwards vs everything else: text encoder, VAE,
sampler and guidance Python). Set OMP_NUM_THREADS to the --threads value. `--backend openvino` runs the
U-Net and VAE decoder through OpenVINO (its U-Net column is then 0: see benchmarks/backend.py instead).

    OMP_NUM_THREADS=1 python benchmarks/default_model.py --runs 20 --threads 1 [--dtype bf16] [--backend B]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--backend", choices=["torch", "openvino"], default="torch")
    parser.add_argument("--model", help="a checkpoint (default: the embedded model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = load(args.model or default_model_path(), dtype=dtype, backend=args.backend)
    request = GenerationRequest(prompt="a smiling yellow face", steps=args.steps, seed=1)
    unet_cpu: list[float] = []
    starts: list[float] = []
    model.unet.register_forward_pre_hook(lambda *_: starts.append(time.process_time()))
    model.unet.register_forward_hook(lambda *_: unet_cpu.append(time.process_time() - starts.pop()) and None)
    run(model, request, progress=False)  # warm-up
    wall, cpu, unet = [], [], []
    for _ in range(args.runs):
        unet_cpu.clear()
        w, c = time.perf_counter(), time.process_time()
        run(model, request, progress=False)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
        unet.append(sum(unet_cpu))
    med = statistics.median
    print(
        f"threads {args.threads}, {args.runs} runs: wall median {med(wall):.3f} s (min {min(wall):.3f}); "
        f"CPU median {med(cpu):.3f} s (min {min(cpu):.3f}); U-Net CPU {med(unet):.3f} s "
        f"({args.steps} forwards, {med(unet) / args.steps * 1e3:.1f} ms each); outside the U-Net "
        f"{med(c - u for c, u in zip(cpu, unet, strict=True)):.3f} s"
    )


if __name__ == "__main__":
    main()
