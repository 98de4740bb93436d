"""txt2img end to end, ours vs diffusers' StableDiffusionPipeline: seconds and peak memory.

An SD1.5-size model with random weights (the same weights on both sides: diffusers' are converted
from ours through the key maps), 512x512, 20 steps of DPM++ 2M with Karras sigmas, CFG 7, batch 1.
Each (implementation, dtype) runs in its own subprocess so peak RSS is its own; the peak is reset
(`/proc/self/clear_refs`) after the model is built, so "peak" is weights + inference, not set-up.

    python benchmarks/txt2img.py --dtypes fp32,bf16 --size 512 --steps 20
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


def build_ours(dtype):  # noqa: ANN201
    import torch

    from latentforge.model import StableDiffusion
    from latentforge.models.families import SD1

    torch.manual_seed(0)
    with torch.device("meta"):
        model = StableDiffusion.from_family(SD1, dtype=dtype, device="meta")
    # materialise in the target dtype directly: no fp32 copy is ever held
    for module in (model.unet, model.vae, model.text_encoder):
        module.to_empty(device="cpu")
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def run_ours(args: argparse.Namespace, dtype) -> dict:  # noqa: ANN001
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    model = build_ours(dtype)
    params = GenerationRequest(
        prompt="a photograph of an astronaut riding a horse",
        negative_prompt="blurry",
        steps=args.steps,
        sampler="DPM++ 2M",
        schedule="Karras",
        cfg_scale=7.0,
        seed=1,
        width=args.size,
        height=args.size,
    )
    run(model, GenerationRequest(prompt="warm-up", steps=1, width=64, height=64), progress=False)
    reset_peak()
    start = time.perf_counter()
    run(model, params, progress=False)
    return {"seconds": time.perf_counter() - start}


def run_diffusers(args: argparse.Namespace, dtype) -> dict:  # noqa: ANN001
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as DUNet
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
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
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
    reset_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(
            "a photograph of an astronaut riding a horse",
            negative_prompt="blurry",
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(1),
        )
    return {"seconds": time.perf_counter() - start}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    result = (run_ours if args.impl == "ours" else run_diffusers)(args, dtype)
    result.update(peak_mib=rss_mib("VmHWM"), impl=args.impl, dtype=args.dtype)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        child(args)
        return
    rows = []
    for dtype in args.dtypes.split(","):
        for impl in ("ours", "diffusers"):
            command = [
                sys.executable,
                __file__,
                "--impl",
                impl,
                "--dtype",
                dtype,
                "--size",
                str(args.size),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.split("RESULT ", 1)[1]))
            print(rows[-1], flush=True)
    print("\n| dtype | impl | seconds | s/step | peak RSS GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['impl']} | {r['seconds']:.1f} | {r['seconds'] / args.steps:.2f} | "
            f"{r['peak_mib'] / 1024:.2f} |"
        )
    for dtype in args.dtypes.split(","):
        ours, theirs = (
            next(r for r in rows if r["dtype"] == dtype and r["impl"] == i) for i in ("ours", "diffusers")
        )
        print(
            f"{dtype}: time ours/diffusers {ours['seconds'] / theirs['seconds']:.2f}, "
            f"peak ours/diffusers {ours['peak_mib'] / theirs['peak_mib']:.2f}"
        )


if __name__ == "__main__":
    main()
