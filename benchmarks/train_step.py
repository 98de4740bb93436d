"""U-Net training-step throughput: our UNetModel vs diffusers' UNet2DConditionModel of the same config.

One step = forward on noisy latents + MSE to the noise + backward + AdamW step, the U-Net task's inner
loop without the frozen encoders. fp32 and bf16 autocast, the implementations interleaved round by
round so that clock and thermal drift hit both alike; the median images/s over rounds is reported.
Usage:
    python benchmarks/train_step.py --config tiny --batch-size 4 --steps 3 --rounds 2      (a smoke run)
    python benchmarks/train_step.py --config sd1 --latent-size 64 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from latentforge.models.configs import UNetConfig
from latentforge.models.families import FAMILIES
from latentforge.models.unet import UNetModel

PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), context_dim=32),
    "small": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2), context_dim=256
    ),
    "sd1": FAMILIES["sd1"].unet,
    "sd2": FAMILIES["sd2"].unet,
}


def diffusers_unet(config: UNetConfig) -> nn.Module:
    """diffusers' UNet2DConditionModel with the same architecture (same parameter count) as ours."""
    from diffusers import UNet2DConditionModel

    widths = [config.model_channels * m for m in config.channel_mult]
    levels = range(len(widths))
    attention = [lvl in config.attention_levels for lvl in levels]
    return UNet2DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(widths),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim,
        # diffusers' legacy name: `attention_head_dim` holds the number of heads per block.
        attention_head_dim=tuple(config.heads_at(w)[0] for w in widths),
        use_linear_projection=config.use_linear_proj,
        norm_num_groups=config.norm_groups,
        transformer_layers_per_block=config.transformer_depth,
    )


def make_step(
    model: nn.Module, forward: Callable[..., torch.Tensor], precision: str, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, noise: torch.Tensor) -> None:
        with autocast:
            pred = forward(model, x, t, context)
        loss = (pred.float() - noise).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--latent-size", type=int, default=16, help="latent side (image side / 8 for SD)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--implementations", default="latentforge,diffusers")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--text-tokens", type=int, default=77)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = PRESETS[args.config]

    models: dict[str, tuple[nn.Module, Callable[..., torch.Tensor]]] = {}
    implementations = args.implementations.split(",")
    if "latentforge" in implementations:
        torch.manual_seed(0)
        ours = UNetModel(config).to(device).train()
        ours.gradient_checkpointing = args.gradient_checkpointing
        models["latentforge"] = (ours, lambda m, x, t, c: m(x, t, c))
    if "diffusers" in implementations:
        torch.manual_seed(0)
        theirs = diffusers_unet(config).to(device).train()
        if args.gradient_checkpointing:
            theirs.enable_gradient_checkpointing()
        models["diffusers"] = (theirs, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, (model, _) in models.items()}
    if len(set(counts.values())) > 1:
        print(f"warning: parameter counts differ, the configs do not match: {counts}")

    precisions = args.precisions.split(",")
    steps = {
        (name, precision): make_step(model, forward, precision, device)
        for name, (model, forward) in models.items()
        for precision in precisions
    }
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, config.in_channels, args.latent_size, args.latent_size)
    x = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    context = torch.randn(args.batch_size, args.text_tokens, config.context_dim, generator=gen).to(device)

    rates: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    peaks: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for key, step in steps.items():  # interleaved: every variant once per round
            for _ in range(args.warmup):
                step(x, t, context, noise)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x, t, context, noise)
            _sync(device)
            rates[key].append(args.steps * args.batch_size / (time.perf_counter() - start))
            if device.type == "cuda":
                peaks[key] = max(peaks.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)

    print(
        f"U-Net {args.config} ({', '.join(f'{n} {c / 1e6:.1f}M params' for n, c in counts.items())}), "
        f"latent {args.latent_size}x{args.latent_size}, batch {args.batch_size}, {args.steps} steps x "
        f"{args.rounds} rounds, {device}, threads {args.threads}"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
    )
    for precision in precisions:
        base = (
            statistics.median(rates[("diffusers", precision)]) if ("diffusers", precision) in rates else None
        )
        for name in models:
            rate = statistics.median(rates[(name, precision)])
            ratio = f"  x{rate / base:.2f} vs diffusers" if base and name != "diffusers" else ""
            memory = f"  peak {peaks[(name, precision)]:.2f} GiB" if (name, precision) in peaks else ""
            print(f"{precision:>5} {name:<12} {rate:9.2f} images/s{ratio}{memory}")


if __name__ == "__main__":
    main()
