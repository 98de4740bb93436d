"""KL-regularised autoencoder (LDM `first_stage_model`, Rombach et al. 2022, appendix G).

Attribute names follow the original checkpoint keys (`encoder.down.N.block.M`, `mid.attn_1`,
`decoder.up.N`, `quant_conv`), so an original VAE loads with `strict=True`. The latent scale
(0.18215 for SD) is not applied here: pipelines apply the family's `latent_scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.attention import multi_head_attention
from latentforge.models.configs import VAEConfig

NORM_EPS = 1e-6


def _norm(config: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut: nn.Conv2d | None = None
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, config: VAEConfig, channels: int) -> None:
        super().__init__()
        self.norm = _norm(config, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        out = multi_head_attention(q, k, v, heads=1)
        out = out.transpose(1, 2).reshape(x.shape)  # [B, HW, C] -> [B, C, H, W]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only, as the original (not padding=1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, config: VAEConfig, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        self.attn_1 = AttnBlock(config, channels)
        self.block_2 = ResnetBlock(config, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, then an optional `downsample` or `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    @property
    def resample(self) -> nn.Module | None:
        return getattr(self, self.resample_name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> moments [B, 2*z, H/f, W/f]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = config.ch
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(config, channels, width))
                channels = width
            self.down.append(Level(blocks, Downsample(width) if level != last else None, "downsample"))
        self.mid = MidBlock(config, channels)
        self.norm_out = _norm(config, channels)
        self.conv_out = nn.Conv2d(channels, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> image [B, out, h*f, w*f]; `up[len-1]` runs first, at the lowest resolution."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        channels = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = MidBlock(config, channels)
        levels: list[Level] = []
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(config, channels, widths[level]))
                channels = widths[level]
            levels.insert(0, Level(blocks, Upsample(channels) if level != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(config, channels)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) from moments [B, 2*C, h, w]; logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(
        self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """mean + std * noise; noise is drawn on the generator's device (CPU by default) when not given."""
        if noise is None:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) per sample [B], summed over latent elements."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder + `quant_conv` -> DiagonalGaussian; `post_quant_conv` + Decoder -> image in [-1, 1]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image [B, 3, H, W] in [-1, 1] (H, W multiples of f) -> posterior over [B, embed_dim, H/f, W/f]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent [B, embed_dim, h, w] -> image [B, 3, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: (reconstruction, posterior), decoding a posterior sample (or its mode)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
