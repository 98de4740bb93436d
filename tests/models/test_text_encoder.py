"""Contract tests for the CLIP text encoder and the OpenCLIP key map on tiny configs."""

from dataclasses import replace

import pytest
import torch

from latentforge.checkpoints.keymap_text import OPENCLIP_LOGIT_SCALE, openclip_to_ours, ours_to_openclip
from latentforge.models.configs import TextEncoderConfig
from latentforge.models.text_encoder import EOS_TOKEN, CLIPTextModel

CONFIG = TextEncoderConfig(max_length=12, layers=3)
PROJECTED = replace(CONFIG, projection_dim=16, activation="gelu", pad_token=0)


def _ids(config: TextEncoderConfig, eos_at: tuple[int, ...] = (4, 11)) -> torch.Tensor:
    """A batch of prompts: random tokens, EOS at the given positions, then the config's padding."""
    ids = torch.randint(1, EOS_TOKEN - 1, (len(eos_at), config.max_length))
    for row, position in enumerate(eos_at):
        ids[row, position] = EOS_TOKEN
        ids[row, position + 1 :] = config.pad_token
    return ids


@pytest.mark.parametrize("config", [CONFIG, PROJECTED])
def test_shapes(config):
    hidden, pooled = CLIPTextModel(config)(_ids(config))
    assert hidden.shape == (2, config.max_length, config.width)
    assert pooled.shape == (2, config.projection_dim or config.width)


def test_shorter_sequences_are_accepted():
    hidden, pooled = CLIPTextModel(CONFIG)(_ids(CONFIG)[:, :7].clone().fill_(EOS_TOKEN))
    assert hidden.shape == (2, 7, CONFIG.width) and pooled.shape == (2, CONFIG.width)


def test_deterministic():
    model = CLIPTextModel(CONFIG).eval()
    ids = _ids(CONFIG)
    first, second = model(ids, clip_skip=2), model(ids, clip_skip=2)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_attention_is_causal():
    model = CLIPTextModel(CONFIG).eval()
    ids = _ids(CONFIG)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % EOS_TOKEN
    hidden, _ = model(ids)
    hidden_changed, _ = model(changed)
    assert torch.equal(hidden[:, :-1], hidden_changed[:, :-1])
    assert not torch.equal(hidden[:, -1], hidden_changed[:, -1])


def test_pooled_reads_the_first_eos_of_the_last_layer():
    model = CLIPTextModel(CONFIG).eval()
    ids = _ids(CONFIG, eos_at=(3, 8))  # SD1 pads with EOS: the first one counts
    hidden, pooled = model(ids)
    assert torch.equal(pooled, hidden[torch.arange(2), torch.tensor([3, 8])])
    _, pooled_skip = model(ids, clip_skip=3)
    assert torch.equal(pooled_skip, pooled)


def test_clip_skip_selects_earlier_layers():
    model = CLIPTextModel(CONFIG).eval()
    ids = _ids(CONFIG)
    outputs = [model(ids, clip_skip=n)[0] for n in range(1, CONFIG.layers + 1)]
    assert all(not torch.equal(a, b) for a, b in zip(outputs[:-1], outputs[1:], strict=True))
    for bad in (0, CONFIG.layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            model(ids, clip_skip=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype):
    model = CLIPTextModel(PROJECTED).to(dtype)
    hidden, pooled = model(_ids(PROJECTED), clip_skip=2)
    assert hidden.dtype == dtype and pooled.dtype == dtype
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()


def test_gradients_reach_every_parameter():
    model = CLIPTextModel(PROJECTED)
    hidden, pooled = model(_ids(PROJECTED))
    (hidden.square().mean() + pooled.square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("config", [CONFIG, PROJECTED])
def test_state_dict_round_trip_is_strict(config):
    source, target = CLIPTextModel(config), CLIPTextModel(config)
    state = source.state_dict()
    assert not any("position_ids" in k for k in state)
    assert ("text_projection.weight" in state) == (config.projection_dim is not None)
    target.load_state_dict(state, strict=True)
    ids = _ids(config)
    assert all(torch.equal(a, b) for a, b in zip(source(ids), target(ids), strict=True))


def test_openclip_keymap_round_trips_bit_exactly():
    ours = CLIPTextModel(PROJECTED).state_dict()
    openclip = ours_to_openclip(ours, PROJECTED)
    assert openclip["logit_scale"].item() == pytest.approx(OPENCLIP_LOGIT_SCALE)
    assert openclip["text_projection"].shape == (PROJECTED.width, PROJECTED.projection_dim)
    assert openclip["transformer.resblocks.0.attn.in_proj_weight"].shape == (
        3 * PROJECTED.width,
        PROJECTED.width,
    )
    back = openclip_to_ours(openclip, PROJECTED)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    again = ours_to_openclip(back, PROJECTED, logit_scale=None)
    assert again.keys() == openclip.keys() - {"logit_scale"}
    assert all(torch.equal(again[k], openclip[k]) for k in again)


def test_openclip_keymap_reports_missing_and_unexpected_keys():
    openclip = ours_to_openclip(CLIPTextModel(PROJECTED).state_dict(), PROJECTED)
    with pytest.raises(ValueError, match="unexpected keys.*visual.proj"):
        openclip_to_ours({**openclip, "visual.proj": torch.zeros(1)}, PROJECTED)
    del openclip["ln_final.bias"]
    with pytest.raises(KeyError, match="ln_final.bias"):
        openclip_to_ours(openclip, PROJECTED)
