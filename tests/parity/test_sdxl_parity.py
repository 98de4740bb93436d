"""SDXL parity on tiny random configs (fp32): the U-Net with its `vector` against diffusers'
UNet2DConditionModel(addition_embed_type="text_time"), the two text encoders against transformers'
CLIPTextModel / CLIPTextModelWithProjection (penultimate hidden states, pooled projection).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection

from latentforge.checkpoints.diffusers_folder import unet_config_from_diffusers
from latentforge.checkpoints.keymap_unet import diffusers_config, diffusers_to_ours, ours_to_diffusers
from latentforge.models.families import TINY_XL, TINY_XL_REFINER
from latentforge.models.text_encoder import EOS_TOKEN, CLIPTextModel
from latentforge.models.unet import UNetModel, vector_conditioning
from references import assert_close, randomize_norms, transformers_text_config


def _unet_pair(config):
    ours = UNetModel(config).eval()
    randomize_norms(ours)
    reference = UNet2DConditionModel(**diffusers_config(config)).eval()
    reference.load_state_dict(ours_to_diffusers(ours.state_dict(), config), strict=True)
    return ours, reference


@pytest.mark.parametrize("family", [TINY_XL, TINY_XL_REFINER], ids=["base", "refiner"])
def test_unet_matches_diffusers_text_time(family):
    config = family.unet
    ours, reference = _unet_pair(config)
    numbers = 2 * len(family.vector_inputs) - ("aesthetic_score" in family.vector_inputs)
    pooled_dim = config.adm_in_channels - numbers * config.vector_embed_dim
    x = torch.randn(2, config.in_channels, 8, 12)
    t = torch.tensor([999.0, 321.5])
    context = torch.randn(2, 5, config.context_dim)
    pooled = torch.randn(2, pooled_dim)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0][:numbers]] * 2)
    time_ids[1] += 64
    with torch.no_grad():
        expected = reference(
            x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        got = ours(x, t, context, vector_conditioning(pooled, time_ids, config.vector_embed_dim))
    assert_close(got, expected)
    # the vector matters: a different size gives a different output
    with torch.no_grad():
        other = ours(x, t, context, vector_conditioning(pooled, time_ids * 0.5, config.vector_embed_dim))
    assert (other - got).abs().max() > 1e-3 * got.abs().max()


@pytest.mark.parametrize("family", [TINY_XL, TINY_XL_REFINER], ids=["base", "refiner"])
def test_unet_config_round_trips_through_diffusers(family):
    assert unet_config_from_diffusers(diffusers_config(family.unet)) == family.unet
    sd = UNetModel(family.unet).state_dict()
    back = diffusers_to_ours(ours_to_diffusers(sd, family.unet), family.unet)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_unet_without_vector_says_what_it_needs():
    ours = UNetModel(TINY_XL.unet)
    with pytest.raises(ValueError, match="needs y"):
        ours(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, TINY_XL.unet.context_dim))


def _ids(config, rows=3, length=77):
    ids = torch.randint(1, EOS_TOKEN - 1, (rows, length))
    for row, eos in enumerate((2, 9, length - 1)[:rows]):
        ids[row, eos] = EOS_TOKEN
        ids[row, eos + 1 :] = config.pad_token
    return ids


@pytest.mark.parametrize(
    ("config", "reference_cls"),
    [(TINY_XL.text_encoder, HFCLIPTextModel), (TINY_XL.text_encoder_2, CLIPTextModelWithProjection)],
    ids=["clip-l", "bigG"],
)
def test_text_encoders_match_transformers(config, reference_cls):
    ours = CLIPTextModel(config).eval()
    randomize_norms(ours)
    reference = reference_cls(transformers_text_config(config)).eval()
    sd = ours.state_dict()
    if reference_cls is HFCLIPTextModel:
        keys = reference.state_dict().keys()
        sd = {k if k in keys else k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = reference.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    ids = _ids(config)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        hidden, pooled = ours(ids, clip_skip=2, final_norm=False)
    # SDXL reads hidden_states[-2] without the final LayerNorm (sgm, diffusers, A1111)
    assert_close(hidden, out.hidden_states[-2])
    if reference_cls is CLIPTextModelWithProjection:
        assert_close(pooled, out.text_embeds)
