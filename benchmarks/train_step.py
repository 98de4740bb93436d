"""U-Net training-step throughput: our UNetModel vs diffusers' UNet2DConditionModel of the same config.

One step = forward on noisy latents + MSE to the noise + backward + AdamW step, the U-Net task's inner
loop without the frozen encoders. fp32 and bf16 autocast, the implementations interleaved round by
round so that clock and thermal drift hit both alike; the median images/s over rounds is reported.
Implementation `latentforge-fused` is ours with every attention on PyTorch's fused SDPA (what ours did
before bf16 CPU training took the written-out attention, models/attention.py).
`--mode lora` trains only LoRA adapters (rank 4 on attention and feed-forward, kohya's default layers) on
a frozen U-Net: ours (`models/lora_layers.py`) vs diffusers' `add_adapter(peft.LoraConfig)`. `--mode ti`
trains one Textual-Inversion vector through a frozen text encoder and U-Net: ours (token-embedding hooks,
`training/tasks/embedding.py`) vs transformers' CLIPTextModel with a resized embedding whose gradient is
kept for the new row only (diffusers' `textual_inversion.py`). Memory: `state` = trainable weights, their
gradients and AdamW moments; `saved` = activations autograd keeps for backward in one step (both exact
byte counts, device-independent); on CUDA also the allocator's peak.
Usage:
    python benchmarks/train_step.py --config tiny --batch-size 4 --steps 3 --rounds 2      (a smoke run)
    python benchmarks/train_step.py --mode lora --precisions fp32 --threads 1
    python benchmarks/train_step.py --config sd1 --latent-size 64 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from latentforge.models import attention
from latentforge.models.configs import UNetConfig
from latentforge.models.families import FAMILIES
from latentforge.models.unet import UNetModel

PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), context_dim=32),
    "small": UNetConfig(
        model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2), context_dim=256
    ),
    # the embedded model's second edition (configs/default/unet_v2.toml): 16x16x8 latents, context 256
    "emoji-v2": UNetConfig(
        in_channels=8,
        out_channels=8,
        model_channels=48,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=32,
        context_dim=256,
        norm_groups=16,
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
    model: nn.Module,
    forward: Callable[..., torch.Tensor],
    precision: str,
    device: torch.device,
    after_backward: Callable[[], None] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, noise: torch.Tensor) -> None:
        with autocast:
            pred = forward(model, x, t, context)
        loss = (pred.float() - noise).pow(2).mean()
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


LORA_LEAVES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def lora_models(config: UNetConfig, device: torch.device, which: list[str]) -> dict[str, tuple]:
    """Rank-4 LoRA (alpha 4) on the attention and feed-forward layers of a frozen U-Net, ours and PEFT's."""
    from latentforge.models.lora_layers import LoRANetwork, LoRASpec, unet_targets

    models: dict[str, tuple] = {}
    if "latentforge" in which:
        torch.manual_seed(0)
        unet = UNetModel(config).to(device).requires_grad_(False)
        layers = unet_targets(unet, ["attention", "feed_forward"])
        network = LoRANetwork(unet, None, layers, {}, LoRASpec(rank=4, alpha=4.0))
        models["latentforge"] = (network, lambda m, x, t, c: m(x, t, c), None)
    if "diffusers" in which:
        from peft import LoraConfig

        torch.manual_seed(0)
        theirs = diffusers_unet(config).to(device).requires_grad_(False)
        theirs.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_LEAVES, init_lora_weights=True))
        models["diffusers"] = (theirs, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample, None)
    return models


class _TextAndUNet(nn.Module):
    def __init__(self, text: nn.Module, unet: nn.Module, vector: nn.Parameter | None) -> None:
        super().__init__()
        self.text, self.unet, self.vector = text, unet, vector


def ti_models(config: UNetConfig, device: torch.device, which: list[str]) -> dict[str, tuple]:
    """One new-token vector through a frozen CLIP text encoder (width = context_dim, 2 layers) and U-Net."""
    from latentforge.models.configs import TextEncoderConfig
    from latentforge.models.text_encoder import CLIPTextModel
    from latentforge.training.tasks.embedding import insert_vectors

    text_config = TextEncoderConfig(
        width=config.context_dim, layers=2, heads=2, mlp_width=4 * config.context_dim
    )
    models: dict[str, tuple] = {}
    if "latentforge" in which:
        torch.manual_seed(0)
        text = CLIPTextModel(text_config).to(device).requires_grad_(False)
        unet = UNetModel(config).to(device).requires_grad_(False)
        vector = nn.Parameter(text.text_model.embeddings.token_embedding.weight[320:321].clone())
        insert_vectors(text.text_model.embeddings.token_embedding, lambda: vector)
        model = _TextAndUNet(text, unet, vector)
        models["latentforge"] = (model, lambda m, x, t, ids: m.unet(x, t, m.text(ids)[0]), None)
    if "diffusers" in which:
        import transformers

        torch.manual_seed(0)
        hf_config = transformers.CLIPTextConfig(
            vocab_size=text_config.vocab_size,
            hidden_size=text_config.width,
            intermediate_size=text_config.mlp_width,
            num_hidden_layers=text_config.layers,
            num_attention_heads=text_config.heads,
            max_position_embeddings=text_config.max_length,
            hidden_act="quick_gelu",
        )
        text = transformers.CLIPTextModel(hf_config).to(device).requires_grad_(False)
        text.resize_token_embeddings(text_config.vocab_size + 1, mean_resizing=False)
        table = text.get_input_embeddings().weight
        table.requires_grad_(True)
        original = table.detach().clone()
        keep = torch.ones(len(table), dtype=torch.bool, device=device)
        keep[-1] = False

        def restore() -> None:  # textual_inversion.py: every row but the new one is put back after the step
            with torch.no_grad():
                table[keep] = original[keep]

        unet = diffusers_unet(config).to(device).requires_grad_(False)
        model = _TextAndUNet(text, unet, None)
        models["diffusers"] = (
            model,
            lambda m, x, t, ids: m.unet(x, t, encoder_hidden_states=m.text(ids)[0]).sample,
            restore,
        )
    return models


def memory_bytes(model: nn.Module, step_forward: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(trainable weights + grads + AdamW moments, activations saved for backward in one step) in bytes."""
    state = sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter):  # weights are counted once, not per use
            saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step_forward().float().pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None
    return state, saved[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fused_attention_forward(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Our U-Net with the written-out attention switched off for this forward (and so its backward)."""
    limit = attention.EXPLICIT_BACKWARD_MAX_WEIGHTS
    attention.EXPLICIT_BACKWARD_MAX_WEIGHTS = -1
    try:
        return model(x, t, c)
    finally:
        attention.EXPLICIT_BACKWARD_MAX_WEIGHTS = limit


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
    parser.add_argument("--mode", choices=("full", "lora", "ti"), default="full")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = PRESETS[args.config]

    models: dict[str, tuple] = {}
    implementations = args.implementations.split(",")
    if args.mode == "lora":
        models = lora_models(config, device, implementations)
    elif args.mode == "ti":
        models = ti_models(config, device, implementations)
    if args.mode == "full" and "latentforge" in implementations:
        torch.manual_seed(0)
        ours = UNetModel(config).to(device).train()
        ours.gradient_checkpointing = args.gradient_checkpointing
        models["latentforge"] = (ours, lambda m, x, t, c: m(x, t, c), None)
    if args.mode == "full" and "latentforge-fused" in implementations:
        torch.manual_seed(0)
        fused = UNetModel(config).to(device).train()
        models["latentforge-fused"] = (fused, _fused_attention_forward, None)
    if args.mode == "full" and "diffusers" in implementations:
        torch.manual_seed(0)
        theirs = diffusers_unet(config).to(device).train()
        if args.gradient_checkpointing:
            theirs.enable_gradient_checkpointing()
        models["diffusers"] = (theirs, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample, None)

    def all_parameters(model: nn.Module) -> set[nn.Parameter]:  # ours keeps the frozen U-Net out of the tree
        return set(model.parameters()) | set(getattr(model, "unet", model).parameters())

    counts = {name: sum(p.numel() for p in all_parameters(model)) for name, (model, *_) in models.items()}
    trainable = {
        n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, *_) in models.items()
    }
    if len(set(counts.values())) > 1 and args.mode != "ti":  # TI: one more embedding row in transformers
        print(f"warning: parameter counts differ, the configs do not match: {counts}")

    precisions = args.precisions.split(",")
    steps = {
        (name, precision): make_step(model, forward, precision, device, after)
        for name, (model, forward, after) in models.items()
        for precision in precisions
    }
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, config.in_channels, args.latent_size, args.latent_size)
    x = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    context = torch.randn(args.batch_size, args.text_tokens, config.context_dim, generator=gen).to(device)
    if (
        args.mode == "ti"
    ):  # token ids with the new word (ours: first id past the vocabulary; transformers' the same)
        ids = torch.full((args.batch_size, 77), 49407, dtype=torch.long)
        ids[:, 0], ids[:, 1:4] = 49406, torch.tensor([320, 49408, 1125])
        context = ids.to(device)
    memory = {
        name: memory_bytes(model, lambda model=model, forward=forward: forward(model, x, t, context))
        for name, (model, forward, _) in models.items()
    }

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

    sizes = ", ".join(f"{n} {c / 1e6:.1f}M params" for n, c in counts.items())
    print(
        f"{args.mode}: U-Net {args.config} ({sizes}), "
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
            peak = f"  peak {peaks[(name, precision)]:.2f} GiB" if (name, precision) in peaks else ""
            state, saved = memory[name]
            print(
                f"{precision:>5} {name:<12} {rate:9.2f} images/s{ratio}  trainable {trainable[name]:,}  "
                f"state {state / 2**20:.2f} MiB  saved {saved / 2**20:.1f} MiB{peak}"
            )


if __name__ == "__main__":
    main()
