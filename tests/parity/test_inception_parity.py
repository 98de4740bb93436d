"""Our FID Inception against pytorch-fid's and torch-fidelity's on the same random weights (no downloads)."""

import pytest
import pytorch_fid.inception as pytorch_fid_inception
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from latentforge.evaluation import inception
from latentforge.evaluation.inception import (
    FIDInceptionV3,
    fid_preprocess,
    load_fid_inception,
    random_fid_inception,
)


@pytest.fixture(scope="module")
def ours() -> FIDInceptionV3:
    return random_fid_inception(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    # Non-square and smaller than 299 so that the bilinear resize is exercised.
    return torch.randint(
        0, 256, (2, 3, 120, 97), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    assert scale > 1e-3, "degenerate activations make the comparison vacuous"
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max abs error {error:.3g} > {rel} * {scale:.3g}"


def test_pool3_matches_pytorch_fid(ours: FIDInceptionV3, images: torch.Tensor, monkeypatch) -> None:
    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it ours instead (strict load there
    # also proves our keys are the pt_inception-2015-12-05 layout).
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: ours.state_dict())
    reference = pytorch_fid_inception.InceptionV3([3], use_fid_inception=True).eval()
    with torch.inference_mode():
        expected = reference(images.float() / 255)[0].flatten(1)  # pytorch-fid takes [0, 1] floats
        actual = ours(images, "legacy-pytorch").pool3
    assert actual.shape == (2, 2048)
    _assert_close(actual, expected)
    assert not torch.allclose(actual[0], actual[1])


def test_logits_match_torch_fidelity(ours: FIDInceptionV3, images: torch.Tensor, tmp_path) -> None:
    # legacy-tensorflow is torch-fidelity's input pipeline (TF1 resize, (x - 128) / 128): whole forward pass.
    path = tmp_path / "weights.pth"
    torch.save(ours.state_dict(), path)
    reference = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"], feature_extractor_weights_path=str(path)
    )
    with torch.inference_mode():
        pool3, logits_unbiased, logits = reference(images)
        actual = ours(images, "legacy-tensorflow")
        other = ours(images, "legacy-pytorch")
    _assert_close(actual.pool3, pool3)
    _assert_close(actual.logits_unbiased, logits_unbiased)
    _assert_close(actual.logits, logits)
    assert not torch.allclose(actual.logits, actual.logits_unbiased)
    # the pipelines differ measurably at 120 x 97, so the comparison above can tell them apart
    assert (other.pool3 - pool3).abs().max() > 100 * 1e-4 * pool3.abs().max()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_fid_inception_round_trip(ours: FIDInceptionV3, tmp_path, suffix: str) -> None:
    # Files converted from TF have no BN step counters; the loader must accept that.
    state_dict = {k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"pt_inception-2015-12-05-test{suffix}"
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    loaded = load_fid_inception(path)
    assert not loaded.training
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    tiny = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(loaded(tiny).pool3, ours(tiny).pool3)


def test_load_fid_inception_lists_bad_keys(ours: FIDInceptionV3, tmp_path) -> None:
    state_dict = ours.state_dict()
    state_dict["AuxLogits.fc.weight"] = torch.zeros(1)
    del state_dict["fc.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(
        ValueError, match=r"missing keys \['fc.bias'\].*unexpected keys \['AuxLogits.fc.weight'\]"
    ):
        load_fid_inception(path)


def test_preprocess_at_299_is_each_references_normalisation() -> None:
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    # At 299 every resize is the identity; pytorch-fid maps x to 2x/255 - 1, TF and clean-fid to (x-128)/128
    expected = 2 * images.float() / 255 - 1
    torch.testing.assert_close(fid_preprocess(images, "legacy-pytorch"), expected, rtol=0, atol=1e-6)
    for mode in ("clean", "legacy-tensorflow"):
        torch.testing.assert_close(fid_preprocess(images, mode), (images.float() - 128) / 128, rtol=0, atol=0)
    assert inception.INPUT_SIZE == 299
    with pytest.raises(ValueError, match="uint8"):
        fid_preprocess(images.float())
