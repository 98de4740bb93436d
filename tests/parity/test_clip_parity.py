"""Parity of our CLIP (ViT image tower, text tower, logits, loss, preprocessing) with open_clip.

Same random weights in ours and open_clip, fp32, quick-GELU on both sides; full-size configs are compared
as key/shape inventories built on the `meta` device.
"""

import math
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import image_transform
from open_clip.transformer import QuickGELU
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from PIL import Image

from latentforge.checkpoints.keymap_clip import openclip_to_ours, ours_to_openclip
from latentforge.models.clip import (
    CLIPConfig,
    CLIPModel,
    VisionConfig,
    VisionTransformer,
    preprocess_images,
)
from latentforge.models.configs import TextEncoderConfig
from latentforge.models.text_encoder import EOS_TOKEN
from latentforge.training.tasks.clip import contrastive_loss

VISION = VisionConfig(
    image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_width=128, projection_dim=24
)
TEXT = TextEncoderConfig(
    max_length=16, width=32, layers=2, heads=4, mlp_width=128, projection_dim=24, pad_token=0
)
CONFIG = CLIPConfig(text=TEXT, vision=VISION)


def _assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= 1e-4 * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def _randomize(module: torch.nn.Module) -> None:
    """Every tensor random (LayerNorm scales near 1, biases non-zero): no key can be mapped wrong unseen."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("logit_scale"):
                param.fill_(math.log(1 / 0.07))
            elif param.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)


def _open_clip_vision(config: VisionConfig) -> OpenClipVisionTransformer:
    activation = QuickGELU if config.activation == "quick_gelu" else torch.nn.GELU
    return OpenClipVisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        mlp_ratio=config.mlp_width / config.width,
        output_dim=config.projection_dim,
        act_layer=activation,
    ).eval()


def _open_clip_model(config: CLIPConfig) -> CLIP:
    vision, text = config.vision, config.text
    vision_cfg = CLIPVisionCfg(
        layers=vision.layers,
        width=vision.width,
        head_width=vision.width // vision.heads,
        mlp_ratio=vision.mlp_width / vision.width,
        patch_size=vision.patch_size,
        image_size=vision.image_size,
    )
    text_cfg = CLIPTextCfg(
        context_length=text.max_length,
        vocab_size=text.vocab_size,
        width=text.width,
        heads=text.heads,
        layers=text.layers,
        mlp_ratio=text.mlp_width / text.width,
    )
    return CLIP(embed_dim=config.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True).eval()


def _ids(config: TextEncoderConfig) -> torch.Tensor:
    ids = torch.randint(1, EOS_TOKEN - 1, (3, config.max_length))
    for row, eos in enumerate((2, 9, config.max_length - 1)):
        ids[row, eos] = EOS_TOKEN
        ids[row, eos + 1 :] = config.pad_token
    return ids


def test_vision_transformer_matches_open_clip():
    ours = VisionTransformer(VISION).eval()
    _randomize(ours)
    reference = _open_clip_vision(VISION)
    reference.load_state_dict(ours.state_dict(), strict=True)  # the image tower shares open_clip's keys
    pixels = torch.randn(4, 3, VISION.image_size, VISION.image_size)
    with torch.no_grad():
        _assert_close(ours(pixels), reference(pixels))


def test_vision_transformer_gelu_matches_open_clip():
    config = replace(VISION, activation="gelu")
    ours = VisionTransformer(config).eval()
    _randomize(ours)
    reference = _open_clip_vision(config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        _assert_close(ours(pixels), reference(pixels))


def test_clip_matches_open_clip():
    reference = _open_clip_model(CONFIG)
    _randomize(reference)
    ours = CLIPModel(CONFIG).eval()
    ours.load_state_dict(openclip_to_ours(reference.state_dict(), CONFIG), strict=True)
    pixels, ids = torch.randn(3, 3, 32, 32), _ids(TEXT)
    with torch.no_grad():
        _assert_close(ours.encode_image(pixels), reference.encode_image(pixels))
        _assert_close(ours.encode_text(ids), reference.encode_text(ids))
        _assert_close(ours.encode_text(ids[:2]), reference.encode_text(ids[:2]))  # short prompts only
        logits_per_image, logits_per_text = ours(pixels, ids)
        reference_image, reference_text = reference.get_logits(pixels, ids)
    _assert_close(logits_per_image, reference_image)
    _assert_close(logits_per_text, reference_text)


def test_key_map_round_trip_is_exact():
    ours = CLIPModel(CONFIG)
    state = ours.state_dict()
    converted = ours_to_openclip(state, CONFIG)
    reference = _open_clip_model(CONFIG)
    reference.load_state_dict(converted, strict=True)
    back = openclip_to_ours(converted, CONFIG)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_loss_matches_open_clip_clip_loss():
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 24, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(16, 24, generator=generator), dim=-1)
    scale = torch.tensor(1 / 0.07)
    reference = ClipLoss()(image, text, scale)
    torch.testing.assert_close(contrastive_loss(image, text, scale), reference, rtol=1e-6, atol=1e-6)


def _vision_config_of(name: str) -> VisionConfig:
    cfg = open_clip.get_model_config(name)
    vision = cfg["vision_cfg"]
    width = vision["width"]
    return VisionConfig(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        width=width,
        layers=vision["layers"],
        heads=width // vision.get("head_width", 64),
        mlp_width=int(width * vision.get("mlp_ratio", 4.0)),
        projection_dim=cfg["embed_dim"],
    )


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14"])
def test_full_size_inventory_matches_open_clip(name):
    cfg = open_clip.get_model_config(name)
    text = cfg["text_cfg"]
    config = CLIPConfig(
        text=TextEncoderConfig(
            width=text["width"],
            layers=text["layers"],
            heads=text["heads"],
            mlp_width=text["width"] * 4,
            projection_dim=cfg["embed_dim"],
        ),
        vision=_vision_config_of(name),
    )
    with torch.device("meta"):
        ours = CLIPModel(config)
        reference = CLIP(**cfg)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    converted = ours_to_openclip(ours.state_dict(), config)
    assert {k: v.shape for k, v in converted.items()} == expected


def test_preprocessing_matches_open_clip_transform():
    """Same size: exact up to float rounding; downscaling 64 -> 32: torch's antialiased bicubic vs PIL's."""
    rng = np.random.default_rng(0)
    array = (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)  # smooth-ish 64x64
    image = Image.fromarray(array)
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1
    for size, atol in ((64, 1e-5), (32, 0.05)):
        reference = image_transform(size, is_train=False)(image)[None]
        ours = preprocess_images(pixels, size)
        torch.testing.assert_close(ours, reference, atol=atol, rtol=0)
