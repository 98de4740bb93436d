"""CLIP (Radford et al. 2021): a ViT image tower and our text tower, trained contrastively.

The image tower keeps OpenAI's / open_clip's attribute names (`conv1`, `class_embedding`, `ln_pre`,
`transformer.resblocks.N.attn.in_proj_weight`, `ln_post`, `proj`), so an OpenAI or open_clip `visual.*`
state dict loads unchanged. The text tower is our `CLIPTextModel` (SD 1.x / transformers layout, under
`text.`); `checkpoints.keymap_clip` converts a whole open_clip CLIP. Notation: f_I, f_T are the L2-normalised
image and text embeddings, s = exp(logit_scale) the inverse temperature, logits = s f_I f_T^T.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.attention import multi_head_attention
from latentforge.models.configs import Activation, TextEncoderConfig, config_from_dict
from latentforge.models.text_encoder import LAYER_NORM_EPS, CLIPTextModel, eos_positions, quick_gelu

# OpenAI CLIP's image normalisation (open_clip's OPENAI_DATASET_MEAN / _STD), applied to [0, 1] pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # temperature 0.07 (CLIP paper, section 2.5)
LOGIT_SCALE_MAX = math.log(100.0)  # s is clipped at 100 "to prevent training instability"


@dataclass(frozen=True)
class VisionConfig:
    """ViT image tower: patch embedding, class token, pre-LN transformer, ln_post, projection."""

    image_size: int = 32
    patch_size: int = 8
    width: int = 32
    layers: int = 2
    heads: int = 2
    mlp_width: int = 128
    activation: Activation = "quick_gelu"
    projection_dim: int = 32

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


def _default_text() -> TextEncoderConfig:
    return TextEncoderConfig(projection_dim=32)


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers; they meet in a shared embedding space of `embed_dim` = the projections' width."""

    text: TextEncoderConfig = field(default_factory=_default_text)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        if self.text.projection_dim != self.vision.projection_dim:
            raise ValueError(
                f"CLIP towers must project to one width: text.projection_dim={self.text.projection_dim}, "
                f"vision.projection_dim={self.vision.projection_dim}; set both to the same number"
            )

    @property
    def embed_dim(self) -> int:
        return self.vision.projection_dim


def clip_config_to_json(config: CLIPConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def clip_config_from_dict(data: dict[str, Any]) -> CLIPConfig:
    """Rebuild a CLIPConfig from `{"text": {...}, "vision": {...}}` (either table may be left out)."""
    unknown = set(data) - {"text", "vision"}
    if unknown:
        raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}; valid: text, vision")
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    vision = dict(data.get("vision", {}))
    if set(vision) - vision_fields:
        raise ValueError(f"unknown VisionConfig fields {sorted(set(vision) - vision_fields)}")
    text = config_from_dict(TextEncoderConfig, dict(data["text"])) if "text" in data else _default_text()
    return CLIPConfig(text=text, vision=VisionConfig(**vision))


def clip_config_from_json(text: str) -> CLIPConfig:
    return clip_config_from_dict(json.loads(text))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class FusedSelfAttention(nn.Module):
    """Bidirectional self-attention with q, k, v fused in one projection (nn.MultiheadAttention's keys)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x [B, N, W]
        return self.out_proj(multi_head_attention(q, k, v, self.heads))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.attn = FusedSelfAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)
        activation = QuickGELU() if config.activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(config.width, config.mlp_width),
                gelu=activation,
                c_proj=nn.Linear(config.mlp_width, config.width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower: images [B, 3, S, S] (CLIP-normalised, S = image_size) -> embeddings [B, D]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        width, scale = config.width, config.width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(scale * torch.randn(width, config.projection_dim))  # x @ proj

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(
                f"the image tower takes {size}x{size} images, got {tuple(pixels.shape[-2:])}; "
                "resize with latentforge.models.clip.preprocess_images"
            )
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, W, g, g] -> [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + g*g, W]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # the class token, [B, W] -> [B, D]


def init_text_tower(text: CLIPTextModel) -> None:
    """open_clip's `TextTransformer.init_parameters` (OpenAI CLIP's init) on our text tower's keys."""
    width, layers = text.config.width, text.config.layers
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    stds = {
        "token_embedding.weight": 0.02,
        "position_embedding.weight": 0.01,
        "q_proj.weight": attn_std,
        "k_proj.weight": attn_std,
        "v_proj.weight": attn_std,
        "out_proj.weight": proj_std,
        "fc1.weight": fc_std,
        "fc2.weight": proj_std,
        "text_projection.weight": width**-0.5,
    }
    with torch.no_grad():
        for name, param in text.named_parameters():
            std = next((v for k, v in stds.items() if name.endswith(k)), None)
            if std is not None:
                nn.init.normal_(param, std=std)
            elif ".self_attn." in name and name.endswith(".bias"):
                nn.init.zeros_(param)  # nn.MultiheadAttention zeroes in_proj_bias and out_proj.bias


class CLIPModel(nn.Module):
    """Image tower `visual`, text tower `text` (our CLIPTextModel) and the learned temperature."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.text = CLIPTextModel(config.text)
        init_text_tower(self.text)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """CLIP-normalised images [B, 3, S, S] (see `preprocess_images`) -> embeddings [B, D]."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, T] -> embeddings [B, D] (pooled EOS state, projected)."""
        # The attention is causal, so the state at the first EOS never sees later tokens: the padding after
        # the longest prompt is dropped (exact, and about 4x less text compute for short captions).
        length = int(eos_positions(input_ids).max()) + 1
        features = self.text(input_ids[:, :length])[1]
        return F.normalize(features, dim=-1) if normalize else features

    def temperature_scale(self) -> torch.Tensor:
        """s = exp(logit_scale), with logit_scale clipped to [0, ln 100] in place first.

        open_clip clamps the parameter after each optimizer step; clamping before each use is the same
        thing seen from the next forward, and unlike a clamp inside the graph it keeps the gradient alive.
        """
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        return self.logit_scale.exp()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [B_i, B_t], logits_per_text [B_t, B_i]): s f_I f_T^T and its transpose."""
        image = self.encode_image(pixels, normalize=True)
        text = self.encode_text(input_ids, normalize=True)
        logits_per_image = self.temperature_scale() * image @ text.T
        return logits_per_image, logits_per_image.T


def preprocess_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> image tower input: centre square, bicubic resize, CLIP mean/std.

    The one place CLIP's input pipeline is written (training, evaluation, feature extraction).
    """
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = images[..., top : top + side, left : left + side].float()
    if side != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True
        )
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


PREPROCESS_ID = "[-1,1]-centre-square-bicubic-antialias-{size}-openai-mean-std"
