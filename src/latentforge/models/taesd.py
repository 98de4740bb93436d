"""TAESD, the tiny autoencoder of Stable Diffusion latents (Ollin Boer Bohan, github.com/madebyollin/taesd;
diffusers' `AutoencoderTiny`): plain 3x3 convolutions and ReLU residual blocks, no attention, no norms.

Layout: `encoder` and `decoder` are Sequentials whose indices equal the keys of the published
`taesd_encoder.pth` / `taesd_decoder.pth` (the decoder's index 0 is the parameter-free `Clamp`), so those
files load with `strict=True`; `checkpoints/taesd.py` maps diffusers' `*.layers.N` names onto them.
Latents are the sampler's (scaled) latents; TAESD works on pixels in [0, 1], this module in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """Stage block counts (encoder: after the stem and each stride-2 conv; decoder: before each x2)."""

    latent_channels: int = 4
    channels: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)


TAESD = TinyAutoencoderConfig()  # taesd (SD 1.x/2.x) and taesdxl (SDXL) share the architecture


def _conv(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """ReLU(conv-ReLU-conv-ReLU-conv(x) + x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
        )
        self.skip = nn.Identity()  # a 1x1 conv in the original when widths differ; they never do here
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


def encoder_layers(config: TinyAutoencoderConfig) -> nn.Sequential:
    c = config.channels
    layers: list[nn.Module] = []
    for stage, blocks in enumerate(config.encoder_blocks):
        layers.append(_conv(3, c) if stage == 0 else _conv(c, c, stride=2, bias=False))
        layers.extend(Block(c) for _ in range(blocks))
    layers.append(_conv(c, config.latent_channels))
    return nn.Sequential(*layers)


def decoder_layers(config: TinyAutoencoderConfig) -> nn.Sequential:
    c = config.channels
    layers: list[nn.Module] = [Clamp(), _conv(config.latent_channels, c), nn.ReLU()]
    for stage, blocks in enumerate(config.decoder_blocks):
        layers.extend(Block(c) for _ in range(blocks))
        if stage < len(config.decoder_blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False)]
    layers.append(_conv(c, 3))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """Pixels [B, 3, H, W] in [-1, 1] <-> latents [B, C, H/f, W/f], f = 2 ** (stages - 1); the encoder is
    optional (previews and fast decoding need only the decoder)."""

    def __init__(self, config: TinyAutoencoderConfig = TAESD, *, encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder_layers(config) if encoder else None
        self.decoder = decoder_layers(config)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.decoder_blocks) - 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder: load taesd_encoder too")
        return self.encoder(pixels.add(1).div(2))  # TAESD takes [0, 1]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).mul(2).sub(1)  # TAESD gives [0, 1]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` (what training calls through DDP)."""
        return self.decode(latents)
