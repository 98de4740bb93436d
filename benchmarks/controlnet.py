"""Cost of one ControlNet unit per sampling step at 512 px: ours vs diffusers' ControlNetModel + U-Net.

Usage: python benchmarks/controlnet.py [--size 512] [--batch 2] [--dtype bf16] [--repeats 2] [--threads 1]

SD 1.5-size U-Net and ControlNet with the same random weights on both sides: ours are built on `meta`,
filled in the dtype, and diffusers' models are built on `meta` and assigned our tensors through the key maps
(the two share storage, so memory holds one copy). One step is a CFG batch (`--batch 2`: cond + uncond) at
the latent size of a `--size` image, under `torch.inference_mode`. Per implementation we time the U-Net alone
and ControlNet + U-Net (residuals added), interleaved after one warm-up each, and report medians; the unit's
cost is the difference. Process CPU seconds are printed too (steadier when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from latentforge.checkpoints import keymap_controlnet, keymap_unet
from latentforge.models.controlnet import ControlNetConfig, ControlNetModel
from latentforge.models.families import SD1
from latentforge.models.unet import UNetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _filled(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module.eval()


def _models(dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    from diffusers import ControlNetModel as DiffusersControlNet
    from diffusers import UNet2DConditionModel

    config = ControlNetConfig.for_base(SD1.unet, SD1.vae.downsampling_factor)
    with torch.device("meta"):
        unet, controlnet = UNetModel(SD1.unet), ControlNetModel(config)
        their_unet = UNet2DConditionModel(**keymap_unet.diffusers_config(SD1.unet))
        their_controlnet = DiffusersControlNet(**keymap_controlnet.diffusers_config(config))
    unet, controlnet = _filled(unet, dtype), _filled(controlnet, dtype)
    their_unet.load_state_dict(keymap_unet.ours_to_diffusers(unet.state_dict(), SD1.unet), assign=True)
    their_controlnet.load_state_dict(
        keymap_controlnet.ours_to_diffusers(controlnet.state_dict(), config), assign=True
    )
    their_unet.eval(), their_controlnet.eval()

    def ours(x, t, context, hint, control: bool):  # noqa: ANN001, ANN202
        residuals = controlnet(x, t, context, hint) if control else None
        return unet(x, t, context, control=residuals)

    def theirs(x, t, context, hint, control: bool):  # noqa: ANN001, ANN202
        down = mid = None
        if control:
            down, mid = their_controlnet(
                x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False
            )
        return their_unet(
            x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample  # fmt: skip

    return {"latentforge": ours, "diffusers": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    models = _models(dtype)
    generator = torch.Generator().manual_seed(0)
    side = args.size // 8
    x = torch.randn(args.batch, 4, side, side, generator=generator).to(dtype)
    context = torch.randn(args.batch, 77, SD1.unet.context_dim, generator=generator).to(dtype)
    hint = torch.rand(args.batch, 3, args.size, args.size, generator=generator).to(dtype)
    t = torch.full((args.batch,), 500.0)
    times: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    with torch.inference_mode():
        outputs = {name: run(x, t, context, hint, True).float() for name, run in models.items()}  # warm-up
        error = (outputs["latentforge"] - outputs["diffusers"]).abs().max() / outputs["diffusers"].abs().max()
        for run in models.values():
            run(x, t, context, hint, False)
        for _ in range(args.repeats):
            for name, run in models.items():
                for control in (False, True):
                    wall, cpu = time.perf_counter(), time.process_time()
                    run(x, t, context, hint, control)
                    times.setdefault((name, control), []).append(
                        (time.perf_counter() - wall, time.process_time() - cpu)
                    )
    print(
        f"{args.size} px, batch {args.batch}, {args.dtype}, {args.threads} thread(s), {args.repeats} repeats"
    )
    print(f"outputs agree to {float(error):.2e} relative (ControlNet + U-Net)")
    print("| implementation | U-Net step, s | + one ControlNet unit, s | unit cost, s | unit / U-Net |")
    print("|---|---|---|---|---|")
    for name in models:  # each cell: wall-clock (process CPU)
        base = [statistics.median(v) for v in zip(*times[(name, False)], strict=True)]
        both = [statistics.median(v) for v in zip(*times[(name, True)], strict=True)]
        cost = [b - a for a, b in zip(base, both, strict=True)]
        print(
            f"| {name} | {base[0]:.2f} ({base[1]:.2f}) | {both[0]:.2f} ({both[1]:.2f}) | "
            f"{cost[0]:.2f} ({cost[1]:.2f}) | {cost[0] / base[0]:.2f} ({cost[1] / base[1]:.2f}) |"
        )


if __name__ == "__main__":
    main()
