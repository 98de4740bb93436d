"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder half steered by a hint image.

Names equal lllyasviel's `cldm.py` keys after stripping `control_model.`: `time_embed`, `input_blocks`,
`middle_block` (built by the U-Net's own `build_encoder`, so a copy of a base U-Net's encoder loads
key for key), `input_hint_block` (the hint encoder, a Sequential whose odd slots are SiLU), `zero_convs.N.0`
(one 1x1 conv per input block) and `middle_block_out.0`. The forward returns one residual per input block
and one for the middle block, which `UNetModel.forward(control=...)` adds at its skips and middle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from latentforge.models.configs import UNetConfig
from latentforge.models.unet import build_encoder, embed_time

# cldm.py's hint encoder widths (diffusers' `conditioning_embedding_out_channels`): three stride-2 convs
# take an SD image (f = 8) to latent size.
SD_HINT_BLOCK_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """The base U-Net's config plus the hint encoder: `len(hint_block_channels) - 1` stride-2 convs, which
    must equal log2 of the VAE factor so the hint reaches latent size."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = SD_HINT_BLOCK_CHANNELS

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)

    @classmethod
    def for_base(cls, unet: UNetConfig, vae_factor: int, hint_channels: int = 3) -> ControlNetConfig:
        """The ControlNet of a model family: SD's hint encoder, cut to the family's VAE factor (2, 4 or 8)."""
        strided = round(math.log2(vae_factor))
        if 2**strided != vae_factor or not 1 <= strided <= len(SD_HINT_BLOCK_CHANNELS) - 1:
            raise ValueError(f"a ControlNet needs a VAE factor of 2, 4 or 8, not {vae_factor}")
        return cls(unet, hint_channels, SD_HINT_BLOCK_CHANNELS[: strided + 1])


def _hint_block(config: ControlNetConfig) -> nn.Sequential:
    """conv-SiLU pairs: in -> c0, per width (c_i -> c_i, c_i -> c_i+1 stride 2), then the zero conv out."""
    widths = config.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [
            nn.Conv2d(a, a, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(a, b, 3, padding=1, stride=2),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(widths[-1], config.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(_zeroed(nn.Conv2d(channels, channels, 1)))


def _zeroed(conv: nn.Module) -> nn.Module:
    for p in conv.parameters():
        nn.init.zeros_(p)
    return conv


class ControlNetModel(nn.Module):
    """(latent [B, in, h, w], t [B], context [B, T, D], hint [B, 3, h*f, w*f]) -> residuals [B, C_i, ...]."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.time_embed, self.input_blocks, self.middle_block, widths = build_encoder(config.unet)
        self.input_hint_block = _hint_block(config)
        self.zero_convs = nn.ModuleList(_zero_conv(w) for w in widths)
        self.middle_block_out = _zero_conv(widths[-1])
        # The zero init of the paper: the hint's last conv and every output conv start at 0, so an
        # untrained ControlNet adds exactly nothing.
        _zeroed(self.input_hint_block[-1])

    @classmethod
    def from_unet(cls, unet: nn.Module, config: ControlNetConfig) -> ControlNetModel:
        """A new ControlNet whose encoder half is a copy of `unet`'s (the paper's initialisation)."""
        model = cls(config).to(next(unet.parameters()).dtype)
        encoder = {
            k: v
            for k, v in unet.state_dict().items()
            if k.startswith(("time_embed.", "input_blocks.", "middle_block."))
        }
        missing, unexpected = model.load_state_dict(encoder, strict=False)
        own = ("input_hint_block.", "zero_convs.", "middle_block_out.")
        if unexpected or any(not k.startswith(own) for k in missing):
            raise ValueError(f"the U-Net's encoder does not fit a ControlNet of {config.unet}")
        return model

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor, hint: torch.Tensor
    ) -> list[torch.Tensor]:
        """Residuals: one per input block (in order), then the middle block's; each shaped as its output."""
        emb_act = embed_time(self.time_embed, self.config.unet, x, timesteps)
        guided_hint = self.input_hint_block(hint.to(x.dtype))  # [B, hint, H*f, W*f] -> [B, base, H, W]
        if guided_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"the hint encodes to {tuple(guided_hint.shape[-2:])}, the latent is {tuple(x.shape[-2:])}: "
                f"give the hint at {self.config.downsampling_factor}x the latent size"
            )
        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb_act, context)
            if i == 0:  # cldm adds the encoded hint after the first conv
                h = h + guided_hint
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb_act, context)
        outs.append(self.middle_block_out(h))
        return outs
