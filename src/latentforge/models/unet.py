"""LDM U-Net (`model.diffusion_model`, Rombach et al. 2022), the noise predictor eps(x_t, t, c).

Attribute names and Sequential indices equal the original checkpoint keys (openaimodel.py layout:
`input_blocks.N`, `middle_block`, `output_blocks.N`, `in_layers`, `emb_layers`, `out_layers`,
`transformer_blocks`), so an original U-Net loads with `strict=True` after stripping
`model.diffusion_model.`. Dropout slots are `nn.Identity` placeholders (`set_dropout` fills the
ResBlocks'). Speed and memory: the time embedding's SiLU is computed once for all ResBlocks; SiLU and
residual adds run in place on freshly produced tensors (never on one autograd saved or a skip connection
still holds); without autograd the feed-forward runs over token chunks, which avoids its huge,
page-faulting GEGLU buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentforge.models.attention import MergePlanner, multi_head_attention
from latentforge.models.configs import UNetConfig
from latentforge.models.deepcache import DeepCache

NORM_EPS = 1e-5  # ResBlocks and `out.0` (openaimodel's GroupNorm32)
TRANSFORMER_NORM_EPS = 1e-6  # SpatialTransformer's GroupNorm (ldm.modules.attention.Normalize)
LAYER_NORM_EPS = 1e-5
FF_CHUNK_ROWS = 1024  # tokens per feed-forward chunk at inference (measured on CPU: 1024-2048 best)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim] in fp32, cos then sin (LDM); fractional timesteps allowed."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]  # [B, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def vector_conditioning(pooled: torch.Tensor, numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's `vector` (`label_emb` input): pooled text [B, P] then each number of [B, N] as `dim` Fourier
    features (sgm's ConcatTimestepEmbedderND, diffusers' add_time_proj) -> [B, P + N * dim]."""
    features = timestep_embedding(numbers.reshape(-1), dim).reshape(numbers.shape[0], -1)  # [B, N * dim]
    return torch.cat([pooled.float(), features], dim=1).to(pooled.dtype)


def _norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # GroupNorm saves its input, not its output, so the activation may overwrite the output.
    return F.silu(norm(x), inplace=True)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, plus the per-channel time embedding, GroupNorm-SiLU-Conv, plus a skip."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int, emb_channels: int) -> None:
        super().__init__()
        groups = config.norm_groups
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels, eps=NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=NORM_EPS),
            nn.SiLU(),
            nn.Identity(),  # dropout in the original
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if in_channels != out_channels:
            self.skip_connection: nn.Module = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """`emb_act` is SiLU(time embedding) [B, E]: `emb_layers.0` is applied once for the whole U-Net."""
        h = self.in_layers[2](_norm_silu(self.in_layers[0], x))
        h += self.emb_layers[1](emb_act)[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.out_layers[3](self.out_layers[2](_norm_silu(self.out_layers[0], h)))
        h += self.skip_connection(x)
        return h


def set_dropout(unet: nn.Module, p: float) -> None:
    """Fill every ResBlock's dropout slot (`out_layers.2`, before its second conv, as in openaimodel) with
    `nn.Dropout(p)`, or empty it again with p = 0. No weights change or appear: a training option, not part
    of the checkpoint. DDPM trained CIFAR-10 with 0.1 against overfitting (Ho et al. 2020, appendix B)."""
    for block in unet.modules():
        if isinstance(block, ResBlock):
            block.out_layers[2] = nn.Dropout(p) if p > 0 else nn.Identity()


class CrossAttention(nn.Module):
    """Multi-head attention; queries from x, keys and values from `context` (x itself when None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # [1] was dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)  # GELU saves its input, so its fresh output may be overwritten


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.token_merging: MergePlanner | None = None  # ToMe, set by models.token_merging (perf)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Each branch ends in a Linear whose output nothing saved: add the residual into it in place.
        if self.token_merging is None:
            h = self.attn1(self.norm1(x))
        else:  # self-attention over merged tokens (ToMe for SD: merge_attn only, as tomesd's default)
            merge, unmerge = self.token_merging.plan(x)
            h = unmerge(self.attn1(merge(self.norm1(x))))
        h += x
        x = self.attn2(self.norm2(h), context)
        x += h
        if torch.is_grad_enabled() and x.requires_grad:
            return x + self.ff(self.norm3(x))
        # No autograd: run the feed-forward over row chunks, in place. The [rows, 8C] GEGLU buffer then
        # stays small instead of a fresh (page-faulting) 80 MB allocation per block at 512 px.
        for rows in x.view(-1, x.shape[-1]).split(FF_CHUNK_ROWS):
            rows += self.ff(self.norm3(rows))
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or Linear for SD 2.x), transformer blocks over H*W tokens, proj_out."""

    def __init__(self, config: UNetConfig, channels: int, depth: int | None = None) -> None:
        super().__init__()
        depth = config.transformer_depth if depth is None else depth
        heads, head_dim = config.heads_at(channels)
        inner = heads * head_dim
        self.use_linear = config.use_linear_proj
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        if self.use_linear:
            self.proj_in: nn.Linear | nn.Conv2d = nn.Linear(channels, inner)
            self.proj_out: nn.Linear | nn.Conv2d = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, config.context_dim, heads, head_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # [B, C, H, W] -> [B, HW, C]
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        # A 1x1 conv is a Linear over tokens: project, then add the residual straight into NCHW.
        if self.proj_out._forward_hooks:  # hooked (LoRA training, models/lora_layers.py): call the module
            h = self.proj_out(h if self.use_linear else h.transpose(1, 2).reshape(batch, -1, height, width))
            h = h if self.use_linear else h.flatten(2).transpose(1, 2).contiguous()  # NCHW -> [B, HW, C]
        else:
            h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.view(batch, height, width, channels).permute(0, 3, 1, 2)  # x first: NCHW result


class Downsample(nn.Module):
    """3x3 conv, stride 2, padding 1 (`op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to the size of the skip it meets, for odd sizes), then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """Layers run in order; ResBlocks also get the time embedding, transformers the context."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(layers)

    def forward(
        self,
        x: torch.Tensor,
        emb_act: torch.Tensor,
        context: torch.Tensor,
        upsample_size: torch.Size | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_act)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def embed_time(
    time_embed: nn.Module,
    config: UNetConfig,
    x: torch.Tensor,
    timesteps: torch.Tensor | float,
    label_emb: nn.Module | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU(time_embed(sinusoid(t)) [+ label_emb(y)]) [B, 4*base]: the leading SiLU of every ResBlock's
    emb_layers, once; `y` is SDXL's `vector` conditioning for configs with `adm_in_channels`."""
    batch = x.shape[0]
    timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
    if timesteps.numel() not in (1, batch):
        raise ValueError(f"got {timesteps.numel()} timesteps for a batch of {batch}; pass 1 or {batch}")
    t_emb = timestep_embedding(timesteps.expand(batch), config.model_channels).to(x.dtype)
    emb = time_embed(t_emb)
    if config.adm_in_channels:
        if label_emb is None or y is None or y.shape != (batch, config.adm_in_channels):
            got = None if y is None else tuple(y.shape)
            raise ValueError(f"this U-Net needs y [{batch}, {config.adm_in_channels}], got {got}")
        emb = emb + label_emb(y.to(emb.dtype))
    return F.silu(emb)


def res_stage(config: UNetConfig, in_channels: int, width: int, level: int) -> list[nn.Module]:
    """A ResBlock, plus a SpatialTransformer at the attention levels."""
    layers: list[nn.Module] = [ResBlock(config, in_channels, width, 4 * config.model_channels)]
    if level in config.attention_levels:
        layers.append(SpatialTransformer(config, width, config.depth_at(level)))
    return layers


def build_encoder(
    config: UNetConfig,
) -> tuple[nn.Sequential, nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """The encoder half: `time_embed`, `input_blocks`, `middle_block` and each input block's output width.

    Shared by the U-Net and the ControlNet (`models/controlnet.py`), whose copy of it has the same keys.
    """
    base = config.model_channels
    widths = [base * m for m in config.channel_mult]
    emb_dim = 4 * base
    time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, base, 3, padding=1))])
    skip_widths = [base]
    channels = base
    for level, width in enumerate(widths):
        for _ in range(config.num_res_blocks):
            input_blocks.append(TimestepEmbedSequential(*res_stage(config, channels, width, level)))
            channels = width
            skip_widths.append(channels)
        if level != len(widths) - 1:
            input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
            skip_widths.append(channels)
    middle_block = TimestepEmbedSequential(
        ResBlock(config, channels, channels, emb_dim),
        SpatialTransformer(config, channels, config.depth_at(len(widths) - 1)),
        ResBlock(config, channels, channels, emb_dim),
    )
    return time_embed, input_blocks, middle_block, skip_widths


class UNetModel(nn.Module):
    """eps (or v) prediction: latent [B, in, H, W], timesteps [B], context [B, T, D] -> [B, out, H, W]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        widths = [config.model_channels * m for m in config.channel_mult]
        self.time_embed, self.input_blocks, self.middle_block, skip_widths = build_encoder(config)
        if config.adm_in_channels:  # sgm's num_classes="sequential": the `vector` conditioning (SDXL)
            emb_dim = 4 * config.model_channels
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
                )
            )
        channels = widths[-1]

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(config.num_res_blocks + 1):
                layers = res_stage(config, channels + skip_widths.pop(), widths[level], level)
                channels = widths[level]
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(config.norm_groups, channels, eps=NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, config.out_channels, 3, padding=1),
        )

    def _run(
        self,
        block: nn.Module,
        h: torch.Tensor,
        emb_act: torch.Tensor,
        context: torch.Tensor,
        upsample_size: torch.Size | None = None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb_act, context, upsample_size, use_reentrant=False)
        return block(h, emb_act, context, upsample_size)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
        deep_cache: DeepCache | None = None,
    ) -> torch.Tensor:
        """Predict the network target (eps for SD 1.x) for a noisy latent.

        Args:
            x: latent [B, in_channels, H, W], any size: each Upsample matches the skip it meets
                (diffusers' `forward_upsample_size`), so images need only be multiples of the VAE factor.
            timesteps: [B] or a scalar (broadcast), integer or continuous in [0, 1000).
            context: text tokens [B, T, context_dim].
            y: the `vector` conditioning [B, adm_in_channels] of models with `label_emb` (SDXL).
            control: ControlNet residuals (`models/controlnet.py`), one per input block then the middle
                block's, added to the skips and the middle block's output (cldm's ControlledUnetModel).
            deep_cache: DeepCache's state of this sampling pass (`models/deepcache.py`): a cached
                evaluation runs only the shallow branch (and uses only its skips' residuals).
        Returns:
            [B, out_channels, H, W] in the dtype of x.
        """
        emb_act = embed_time(self.time_embed, self.config, x, timesteps, getattr(self, "label_emb", None), y)

        blocks = len(self.input_blocks)
        cached = deep_cache is not None and deep_cache.reuses(x, blocks)
        depth = deep_cache.branch + 1 if cached and deep_cache is not None else blocks  # input blocks to run
        skips = []
        h = x
        for block in self.input_blocks[:depth]:
            h = self._run(block, h, emb_act, context)
            skips.append(h)
        if cached and deep_cache is not None:  # the deep features of the last full evaluation
            h = deep_cache.feature(x.shape[0])
        else:
            h = self._run(self.middle_block, h, emb_act, context)
            if control is not None:
                h = h + control[-1]
        for block in self.output_blocks[blocks - depth :]:
            if deep_cache is not None and len(skips) == deep_cache.branch + 1:
                deep_cache.keep(h)
            skip = skips.pop()
            if control is not None:  # never in place: autograd may have saved the skip
                skip = skip + control[len(skips)]
            h = torch.cat([h, skip], dim=1)  # [B, C + C_skip, H, W]
            h = self._run(block, h, emb_act, context, skips[-1].shape[-2:] if skips else None)
        return self.out[2](_norm_silu(self.out[0], h))
