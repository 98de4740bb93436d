"""Contract tests for CLIP on tiny configs: shapes, temperature, preprocessing, configs, gradients, dtypes."""

import math
from dataclasses import replace

import pytest
import torch

from latentforge.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    LOGIT_SCALE_MAX,
    CLIPConfig,
    CLIPModel,
    VisionConfig,
    clip_config_from_dict,
    clip_config_from_json,
    clip_config_to_json,
    preprocess_images,
)
from latentforge.models.configs import TextEncoderConfig
from latentforge.models.tokenizer import CLIPTokenizer

TEXT = TextEncoderConfig(max_length=16, width=32, layers=2, heads=2, projection_dim=16)
CONFIG = CLIPConfig(text=TEXT, vision=VisionConfig(image_size=16, patch_size=4, projection_dim=16))


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = CLIPTokenizer.for_config(TEXT)([f"a photo number {i}" for i in range(batch)])
    return torch.randn(batch, 3, 16, 16), ids


def test_shapes_and_logits_are_scaled_cosines():
    model = CLIPModel(CONFIG).eval()
    pixels, ids = _inputs()
    image, text = model.encode_image(pixels), model.encode_text(ids)
    assert image.shape == text.shape == (3, 16)
    logits_per_image, logits_per_text = model(pixels, ids)
    cosine = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(logits_per_image, cosine / 0.07)
    assert torch.equal(logits_per_text, logits_per_image.T)


def test_text_embedding_is_the_text_towers_pooled_output():
    model = CLIPModel(CONFIG).eval()
    _, ids = _inputs()
    with torch.no_grad():  # encode_text drops the padding after the last EOS: the same numbers
        torch.testing.assert_close(model.encode_text(ids), model.text(ids)[1], rtol=1e-5, atol=1e-6)


def test_logit_scale_starts_at_clip_temperature_and_is_clamped_at_100():
    model = CLIPModel(CONFIG)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.temperature_scale().item() == pytest.approx(100.0)
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)  # the parameter itself, as open_clip
    scale = model.temperature_scale()
    scale.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.item() > 0  # gradient stays alive


def test_deterministic_and_batch_independent():
    model = CLIPModel(CONFIG).eval()
    pixels, ids = _inputs(4)
    with torch.no_grad():
        full = model.encode_image(pixels), model.encode_text(ids)
        again = model.encode_image(pixels), model.encode_text(ids)
        single = model.encode_image(pixels[:1]), model.encode_text(ids[:1])
    assert all(torch.equal(a, b) for a, b in zip(full, again, strict=True))
    torch.testing.assert_close(single[0], full[0][:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single[1], full[1][:1], rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter():
    model = CLIPModel(CONFIG)
    pixels, ids = _inputs()
    logits_per_image, _ = model(pixels, ids)
    logits_per_image.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # token embeddings of ids that do not occur get no gradient; everything else must
    assert missing == [], missing
    unused = model.text.text_model.embeddings.token_embedding.weight.grad.abs().sum(1) == 0
    assert unused.sum() == TEXT.vocab_size - len(ids.unique())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    model = CLIPModel(CONFIG).eval()
    pixels, ids = _inputs()
    reference = model(pixels, ids)[0]
    with torch.no_grad():
        low = model.to(dtype)(pixels.to(dtype), ids)[0]
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, atol=0.5, rtol=0.1)


def test_wrong_image_size_is_explained():
    with pytest.raises(ValueError, match="preprocess_images"):
        CLIPModel(CONFIG).encode_image(torch.randn(1, 3, 32, 32))


def test_preprocess_resizes_crops_and_normalises():
    grey = torch.zeros(2, 3, 20, 30)  # mid grey in [-1, 1], not square
    out = preprocess_images(grey, 16)
    assert out.shape == (2, 3, 16, 16)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out))
    wide = torch.cat([-torch.ones(1, 3, 16, 8), torch.ones(1, 3, 16, 16), -torch.ones(1, 3, 16, 8)], dim=3)
    torch.testing.assert_close(preprocess_images(wide, 16), preprocess_images(torch.ones(1, 3, 16, 16), 16))


def test_config_round_trip_and_errors():
    assert clip_config_from_json(clip_config_to_json(CONFIG)) == CONFIG
    assert clip_config_from_dict({"vision": {"width": 64, "heads": 4}}).vision.width == 64
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPConfig(text=replace(TEXT, projection_dim=8), vision=VisionConfig(projection_dim=16))
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown"):
        clip_config_from_dict({"vision": {"depth": 3}})


def test_builds_on_meta():
    with torch.device("meta"):
        model = CLIPModel(replace(CONFIG, vision=replace(CONFIG.vision, width=768, heads=12, layers=12)))
    assert all(p.is_meta for p in model.parameters())


def test_feature_extractor_and_clip_score():
    from latentforge.evaluation.clip_features import clip_image_extractor, clip_score_of, encode_captions
    from latentforge.evaluation.features import FeatureExtractor, extract_features

    model = CLIPModel(CONFIG)
    extractor = clip_image_extractor(model, name="tiny")
    assert isinstance(extractor, FeatureExtractor) and "16" in extractor.preprocess_id
    images = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    features = extract_features(extractor, images, batch_size=2, progress=False)
    assert features.shape == (5, 16)
    torch.testing.assert_close(torch.from_numpy(features).norm(dim=1), torch.ones(5))
    expected = model.encode_image(preprocess_images(images.float() / 127.5 - 1, 16), normalize=True)
    torch.testing.assert_close(torch.from_numpy(features), expected.detach())
    captions = [f"caption {i}" for i in range(5)]
    text = encode_captions(model, captions, batch_size=2)
    assert text.shape == (5, 16)
    cosine = (torch.from_numpy(features) * torch.from_numpy(text)).sum(1).mean().item()
    assert clip_score_of(model, images, captions) == pytest.approx(max(100 * cosine, 0.0), abs=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.float())
