"""Parity of our CLIP text encoder with transformers (SD 1.x layout) and open_clip (SD 2.x layout).

Same random weights in ours and the reference, fp32; full-size configs are compared as key/shape
inventories built on the `meta` device against the references' own ViT-L/14 and ViT-H/14 configs.
"""

from dataclasses import replace

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPTextModelWithProjection

from latentforge.checkpoints.keymap_text import openclip_to_ours, ours_to_openclip
from latentforge.models.configs import TextEncoderConfig
from latentforge.models.families import SD1_TEXT, SD2_TEXT
from latentforge.models.text_encoder import EOS_TOKEN, CLIPTextModel
from references import transformers_text_config

SD1_TINY = TextEncoderConfig(max_length=16, width=32, layers=3, heads=4, mlp_width=64)
SD2_TINY = replace(SD1_TINY, activation="gelu", mlp_width=128, projection_dim=24, pad_token=0)


def _assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= 1e-4 * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def _model(config: TextEncoderConfig) -> CLIPTextModel:
    """Random weights with CLIP's embedding scales, so LayerNorm inputs are small and eps matters."""
    model = CLIPTextModel(config).eval()
    torch.nn.init.normal_(model.text_model.embeddings.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(model.text_model.embeddings.position_embedding.weight, std=0.01)
    return model


def _ids(config: TextEncoderConfig) -> torch.Tensor:
    ids = torch.randint(1, EOS_TOKEN - 1, (3, config.max_length))
    for row, eos in enumerate((2, 9, config.max_length - 1)):
        ids[row, eos] = EOS_TOKEN
        ids[row, eos + 1 :] = config.pad_token
    return ids


def _transformers_keys(config: TextEncoderConfig) -> dict[str, torch.Size]:
    # CLIPTextModelWithProjection keeps the `text_model.` prefix in transformers 4.x and 5.x alike
    with torch.device("meta"):
        reference = CLIPTextModelWithProjection(transformers_text_config(config))
    shapes = {k: v.shape for k, v in reference.state_dict().items() if "position_ids" not in k}
    if config.projection_dim is None:
        del shapes["text_projection.weight"]
    return shapes


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY])
def test_matches_transformers(config):
    ours = _model(config)
    reference = CLIPTextModelWithProjection(transformers_text_config(config)).eval()
    state = ours.state_dict()
    if config.projection_dim is None:  # keep the reference's own random projection; ours has none
        state = {**state, "text_projection.weight": reference.text_projection.weight}
    reference.load_state_dict(state, strict=True)
    ids = _ids(config)
    with torch.no_grad():
        out = reference.text_model(input_ids=ids, output_hidden_states=True)
        projected = reference(input_ids=ids).text_embeds
        hidden, pooled = ours(ids)
        hidden_skip2, _ = ours(ids, clip_skip=2)
    _assert_close(hidden, out.last_hidden_state)
    _assert_close(hidden_skip2, reference.text_model.final_layer_norm(out.hidden_states[-2]))
    _assert_close(pooled, projected if config.projection_dim else out.pooler_output)


def _open_clip_model(config: TextEncoderConfig) -> CLIP:
    text = CLIPTextCfg(
        context_length=config.max_length,
        vocab_size=config.vocab_size,
        width=config.width,
        heads=config.heads,
        layers=config.layers,
        mlp_ratio=config.mlp_width / config.width,
    )
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    return CLIP(embed_dim=config.projection_dim, vision_cfg=vision, text_cfg=text, quick_gelu=False).eval()


def test_matches_open_clip_as_sd2_uses_it():
    config = SD2_TINY
    ours = _model(config)
    reference = _open_clip_model(config)
    result = reference.load_state_dict(ours_to_openclip(ours.state_dict(), config), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("visual.") for k in result.missing_keys)
    ids = _ids(config)
    with torch.no_grad():
        pooled_reference = reference.encode_text(ids)
        # FrozenOpenCLIPEmbedder(layer="penultimate"): all resblocks but the last, then ln_final
        x = reference.token_embedding(ids) + reference.positional_embedding
        batch_first = getattr(reference.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in reference.transformer.resblocks[:-1]:
            x = block(x, attn_mask=reference.attn_mask)
        x = x if batch_first else x.transpose(0, 1)
        penultimate_reference = reference.ln_final(x)
        hidden, pooled = ours(ids, clip_skip=2)
    _assert_close(hidden, penultimate_reference)
    _assert_close(pooled, pooled_reference)


def _reference_text_config(name: str) -> TextEncoderConfig:
    """Our config for an open_clip model config, read from open_clip's own json."""
    cfg = open_clip.get_model_config(name)
    text = cfg["text_cfg"]
    return TextEncoderConfig(
        vocab_size=text["vocab_size"],
        max_length=text["context_length"],
        width=text["width"],
        layers=text["layers"],
        heads=text["heads"],
        mlp_width=int(text["width"] * text.get("mlp_ratio", 4.0)),
        projection_dim=cfg["embed_dim"],
    )


def test_sd1_inventory_matches_transformers_vit_l14():
    reference_config = replace(_reference_text_config("ViT-L-14"), projection_dim=None)
    with torch.device("meta"):
        ours = CLIPTextModel(SD1_TEXT)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == _transformers_keys(reference_config)


def test_sd2_inventory_matches_open_clip_vit_h14():
    reference_config = _reference_text_config("ViT-H-14")
    assert SD2_TEXT.projection_dim == reference_config.projection_dim
    with torch.device("meta"):
        ours = CLIPTextModel(SD2_TEXT)
        reference = CLIP(**open_clip.get_model_config("ViT-H-14"))
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("visual.")}
    converted = ours_to_openclip(ours.state_dict(), SD2_TEXT)
    assert {k: v.shape for k, v in converted.items()} == expected
    restored = openclip_to_ours({k: v for k, v in reference.state_dict().items() if k in expected}, SD2_TEXT)
    assert {k: v.shape for k, v in restored.items()} == {k: v.shape for k, v in ours.state_dict().items()}
