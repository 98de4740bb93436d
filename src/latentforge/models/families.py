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
# The numbers in SDXL's `vector`, each a pair except the score (sgm's embedders, in order).
VectorInput = Literal["original_size", "crop_top_left", "target_size", "aesthetic_score"]


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
    # SDXL: a second text encoder (OpenCLIP bigG; the refiner has it alone, as `text_encoder`); its pooled
    # output and these numbers, each through `unet.vector_embed_dim` Fourier features, are the `vector`.
    text_encoder_2: TextEncoderConfig | None = None
    vector_inputs: tuple[VectorInput, ...] = ()
    hidden_final_norm: bool = True  # SDXL conditions on penultimate states without the final LayerNorm

    @property
    def is_sdxl(self) -> bool:
        """Conditioned on a `vector` (sgm's `conditioner.embedders.*` checkpoint layout)."""
        return bool(self.vector_inputs)

    @property
    def is_refiner(self) -> bool:
        """The SDXL refiner: trained only on the low-noise end, for img2img-style refinement."""
        return "aesthetic_score" in self.vector_inputs

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

# SDXL (Podell et al. 2023; sgm configs sd_xl_base.yaml / sd_xl_refiner.yaml): CLIP ViT-L and OpenCLIP
# ViT-bigG, penultimate layers concatenated (768 + 1280 = 2048); vector = pooled bigG (1280) + 6 x 256.
SDXL_TEXT_G = TextEncoderConfig(
    width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280, pad_token=0
)
SDXL_UNET = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_levels=(1, 2),
    level_depths=(0, 2, 10),
    num_heads=None,
    head_dim=64,
    context_dim=2048,
    use_linear_proj=True,
    adm_in_channels=2816,
    vector_embed_dim=256,
)
SDXL_SIZES: tuple[VectorInput, ...] = ("original_size", "crop_top_left", "target_size")
SDXL = ModelFamily(
    "sdxl-base",
    unet=SDXL_UNET,
    vae=SD_VAE,
    text_encoder=SD1_TEXT,
    text_encoder_2=SDXL_TEXT_G,
    latent_scale=0.13025,
    default_size=1024,
    default_clip_skip=2,  # both encoders' penultimate layer, the only one SDXL uses
    vector_inputs=SDXL_SIZES,
    hidden_final_norm=False,
)
# The refiner: bigG alone (1280 context), 384 channels, depth 4; vector = pooled (1280) + 5 x 256.
SDXL_REFINER = replace(
    SDXL,
    name="sdxl-refiner",
    unet=replace(
        SDXL_UNET,
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        level_depths=(),
        transformer_depth=4,
        context_dim=1280,
        adm_in_channels=2560,
    ),
    text_encoder=SDXL_TEXT_G,
    text_encoder_2=None,
    text_layout="openclip",
    vector_inputs=("original_size", "crop_top_left", "aesthetic_score"),
)

# The SDXL layouts at test size: two tiny text encoders (CLIP-L-like and bigG-like with a projection).
TINY_XL_TEXT_L = TextEncoderConfig(width=16, layers=3, heads=2, mlp_width=32)
TINY_XL_TEXT_G = TextEncoderConfig(
    width=24, layers=3, heads=2, mlp_width=48, activation="gelu", projection_dim=12, pad_token=0
)
TINY_XL_UNET = UNetConfig(
    model_channels=16,
    channel_mult=(1, 2, 4),
    attention_levels=(1, 2),
    level_depths=(0, 1, 2),
    num_heads=None,
    head_dim=8,
    context_dim=40,  # 16 + 24
    use_linear_proj=True,
    norm_groups=8,
    adm_in_channels=12 + 6 * 8,
    vector_embed_dim=8,
)
TINY_XL = replace(
    SDXL,
    name="tiny-sdxl",
    unet=TINY_XL_UNET,
    vae=VAEConfig(ch=8, norm_groups=4),
    text_encoder=TINY_XL_TEXT_L,
    text_encoder_2=TINY_XL_TEXT_G,
    default_size=64,
)
TINY_XL_REFINER = replace(
    SDXL_REFINER,
    name="tiny-sdxl-refiner",
    unet=replace(
        TINY_XL_UNET,
        model_channels=24,
        channel_mult=(1, 2, 4, 4),
        level_depths=(),
        transformer_depth=2,
        context_dim=24,
        adm_in_channels=12 + 5 * 8,
    ),
    vae=TINY_XL.vae,
    text_encoder=TINY_XL_TEXT_G,
    default_size=64,
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
        SDXL,
        SDXL_REFINER,
        replace(SDXL, name="sdxl-inpaint", unet=replace(SDXL_UNET, in_channels=9)),
        TINY_XL,
        TINY_XL_REFINER,
    )
}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
