"""The table of model families: the only place where SD architecture numbers are written.

A family pairs the three component configs with what the weights alone cannot say: the
prediction type, the latent scale, how the checkpoint stores the text tower, and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from latentforge.models.configs import TextEncoderConfig, UNetConfig, VAEConfig

Prediction = Literal["epsilon", "v", "x0"]
# How the checkpoint stores the text tower: cond_stage_model.transformer.* (SD1), .model.* (SD2).
TextLayout = Literal["hf", "openclip"]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    prediction: Prediction = "epsilon"
    latent_scale: float = 0.18215
    text_layout: TextLayout = "hf"
    default_size: int = 512
    default_clip_skip: int = 1
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def with_prediction(self, prediction: Prediction) -> ModelFamily:
        """This family with another prediction type (for one the table has no entry for)."""
        return replace(self, prediction=prediction)


SD_VAE = VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)

SD1_TEXT = TextEncoderConfig(width=768, layers=12, heads=12, mlp_width=3072, activation="quick_gelu")
SD2_TEXT = TextEncoderConfig(
    width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", projection_dim=1024, pad_token=0
)

SD1_UNET = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_levels=(0, 1, 2),
    num_heads=8,
    context_dim=768,
)
SD2_UNET = replace(SD1_UNET, num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True)

SD1 = ModelFamily("sd1", unet=SD1_UNET, vae=SD_VAE, text_encoder=SD1_TEXT)
SD2 = ModelFamily(
    "sd2", unet=SD2_UNET, vae=SD_VAE, text_encoder=SD2_TEXT, text_layout="openclip", default_clip_skip=2
)

TINY = ModelFamily(
    "tiny",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text_encoder=TextEncoderConfig(),
    default_size=64,
)

# The SD 2.x layout at test size (OpenCLIP text layout, linear projections, heads given by width, a
# penultimate-layer text encoder): small enough that a trained eps/v pair ships as test fixtures.
TINY_SD2 = ModelFamily(
    "tiny-sd2",
    unet=UNetConfig(
        model_channels=8, num_heads=None, head_dim=8, context_dim=8, use_linear_proj=True, norm_groups=4
    ),
    vae=VAEConfig(ch=4, norm_groups=4),
    text_encoder=TextEncoderConfig(
        width=8, layers=2, heads=2, mlp_width=16, activation="gelu", projection_dim=8, pad_token=0
    ),
    text_layout="openclip",
    default_size=64,
    default_clip_skip=2,
)

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        SD1,
        replace(SD1, name="sd1-inpaint", unet=replace(SD1_UNET, in_channels=9)),
        SD2,
        replace(SD2, name="sd2-v", prediction="v", default_size=768),
        replace(SD2, name="sd2-inpaint", unet=replace(SD2_UNET, in_channels=9)),
        TINY,
        TINY_SD2,
        # its v twin, 1.5x the size as sd2-v (768) is to sd2 (512)
        replace(TINY_SD2, name="tiny-sd2-v", prediction="v", default_size=96),
    )
}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
