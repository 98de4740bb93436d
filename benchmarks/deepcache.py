"""DeepCache: CPU seconds per image, ours with and without the cache against diffusers'
StableDiffusionPipeline with and without the `deepcache` package's DeepCacheSDHelper, the same weights
on both sides (diffusers' converted from ours through the key maps). One process, interleaved rounds,
median per variant: the machine is shared, so compare the ratios, not the seconds.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/deepcache.py --model embedded --rounds 5
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/deepcache.py --model sd15 --size 256 --steps 10 --rounds 3

`embedded`: the default model (64 px, 20 steps, fp32); `sd15`: SD1.5-size random weights in bf16. Both:
DPM++ 2M Karras, CFG 7 with a negative prompt, batch 1, end to end (text encoder, sampling, VAE decode).
`mean |diff|` is the mean absolute pixel difference (0-255) of the image against the same side without
the cache (same seed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT, NEGATIVE = "a smiling yellow face with sunglasses", "blurry"


def build_model(name: str):  # noqa: ANN201
    if name == "embedded":
        from latentforge.checkpoints.loading import default_model_path
        from latentforge.model import load

        return load(default_model_path()).eval()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from txt2img import build_ours  # SD1.5 size on meta, materialised with random weights

    return build_ours(torch.bfloat16)


def diffusers_pipe(model):  # noqa: ANN001, ANN201
    """diffusers' pipeline holding `model`'s weights (the parity tests' conversion)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from latentforge.checkpoints import keymap_unet, keymap_vae
    from references import diffusers_vae_config, transformers_text_config, write_hf_clip_vocab

    f, dtype = model.family, model.dtype
    unet = UNet2DConditionModel(**keymap_unet.diffusers_config(f.unet))
    unet.load_state_dict(keymap_unet.ours_to_diffusers(model.unet.state_dict(), f.unet), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(f.vae), scaling_factor=f.latent_scale)
    vae.load_state_dict(keymap_vae.ours_to_diffusers(model.vae.state_dict(), f.vae), strict=True)
    text = CLIPTextModel(transformers_text_config(f.text_encoder))
    text_sd = {k.removeprefix("text_model."): v for k, v in model.text_encoder.state_dict().items()}
    text.load_state_dict(text_sd, strict=False)  # transformers 5 keeps a position_ids buffer of its own
    folder = write_hf_clip_vocab(Path(tempfile.mkdtemp()))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="<|endoftext|>")
    betas = {"beta_start": f.beta_start, "beta_end": f.beta_end, "beta_schedule": f.beta_schedule}
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype).eval(),
        text_encoder=text.to(dtype).eval(),
        tokenizer=tokenizer,
        unet=unet.to(dtype).eval(),
        scheduler=DPMSolverMultistepScheduler(**betas, use_karras_sigmas=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["embedded", "sd15"], default="embedded")
    parser.add_argument("--size", type=int, default=0, help="0: 64 (embedded), 256 (sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", default="2,3")
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from DeepCache import DeepCacheSDHelper

    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    size = args.size or (64 if args.model == "embedded" else 256)
    model = build_model(args.model)
    pipe = diffusers_pipe(model)
    helper = DeepCacheSDHelper(pipe=pipe)
    intervals = [0, *(int(n) for n in args.intervals.split(","))]

    def ours(interval: int, steps: int = args.steps) -> np.ndarray:
        request = GenerationRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler="DPM++ 2M", schedule="Karras",
            cfg_scale=7.0, seed=1, width=size, height=size, deepcache_interval=interval,
            deepcache_branch=args.branch if interval else 0,
        )  # fmt: skip
        return np.asarray(run(model, request, progress=False)[0].image, dtype=np.float64)

    def theirs(interval: int, steps: int = args.steps) -> np.ndarray:
        if interval:
            helper.set_params(cache_interval=interval, cache_branch_id=args.branch)
            helper.enable()
        try:
            with torch.inference_mode():
                image = pipe(
                    PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                    height=size, width=size, generator=torch.Generator().manual_seed(1),
                ).images[0]  # fmt: skip
        finally:
            if interval:
                helper.disable()
        return np.asarray(image, dtype=np.float64)

    variants = [(side, n) for side in ("ours", "diffusers") for n in intervals]
    generate = {"ours": ours, "diffusers": theirs}
    seconds: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    images: dict[tuple[str, int], np.ndarray] = {}
    for side, _ in variants:  # warm-up
        generate[side](0, 2)
    for _ in range(args.rounds):
        for variant in variants:
            start = time.process_time()
            images[variant] = generate[variant[0]](variant[1])
            seconds[variant].append(time.process_time() - start)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    print(
        f"\n{args.model}, {size}x{size}, {args.steps} steps DPM++ 2M Karras, CFG 7, branch {args.branch}, "
        f"{args.rounds} rounds, torch threads 1\n"
    )
    print("| side | DeepCache interval | CPU s/image | speed-up | ours / diffusers | mean abs diff |")
    print("|---|---|---|---|---|---|")
    for side, n in variants:
        diff = float(np.abs(images[(side, n)] - images[(side, 0)]).mean())
        cpu, speedup = median[(side, n)], median[(side, 0)] / median[(side, n)]
        versus = median[("ours", n)] / median[("diffusers", n)]
        print(f"| {side} | {n or 'off'} | {cpu:.3f} | {speedup:.2f}x | {versus:.2f} | {diff:.2f} |")


if __name__ == "__main__":
    main()
