"""Single-file checkpoints: save/load round trips, family detection, EMA, VAE swap, clear errors."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from latentforge.checkpoints.errors import KeyMismatchError, UnknownArchitectureError
from latentforge.checkpoints.single_file import save_single_file, to_single_file_state_dict
from latentforge.model import StableDiffusion, load
from latentforge.models.configs import TextEncoderConfig, UNetConfig
from latentforge.models.families import TINY

TINY_SD2 = replace(
    TINY,
    name="tiny-sd2",
    text_layout="openclip",
    text_encoder=TextEncoderConfig(activation="gelu", projection_dim=32, pad_token=0),
    unet=UNetConfig(num_heads=None, head_dim=16, use_linear_proj=True),
)


def _save(bundle: StableDiffusion, path, **kwargs):
    save_single_file(
        path,
        bundle.unet.state_dict(),
        bundle.vae.state_dict(),
        bundle.text_encoder.state_dict(),
        bundle.family,
        **kwargs,
    )


def _assert_same_weights(a: StableDiffusion, b: StableDiffusion):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.mark.parametrize("family", [TINY, TINY_SD2], ids=["sd1-layout", "sd2-layout"])
def test_save_load_is_bit_exact(tmp_path, family):
    bundle = StableDiffusion.from_family(family)
    _save(bundle, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert loaded.family == family
    _assert_same_weights(bundle, loaded)
    assert loaded.short_hash is not None and len(loaded.short_hash) == 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_in_half_precision(tmp_path, dtype):
    bundle = StableDiffusion.from_family(TINY)
    _save(bundle, tmp_path / "m.safetensors", dtype=dtype)
    loaded = load(tmp_path / "m.safetensors", dtype=dtype)
    assert loaded.dtype == dtype
    expected = bundle.unet.state_dict()["out.2.weight"].to(dtype)
    assert torch.equal(loaded.unet.state_dict()["out.2.weight"], expected)


def test_family_detected_from_shapes_without_metadata(tmp_path):
    bundle = StableDiffusion.from_family(TINY)
    sd = to_single_file_state_dict(
        bundle.unet.state_dict(), bundle.vae.state_dict(), bundle.text_encoder.state_dict(), TINY
    )
    sd["alphas_cumprod"] = torch.rand(1000)  # training buffers are ignored
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    loaded = load(tmp_path / "m.ckpt", compute_hash=False)
    assert loaded.family.name == "tiny"
    _assert_same_weights(bundle, loaded)


def test_ema_weights_on_request(tmp_path):
    bundle = StableDiffusion.from_family(TINY)
    sd = to_single_file_state_dict(
        bundle.unet.state_dict(), bundle.vae.state_dict(), bundle.text_encoder.state_dict(), TINY
    )
    ema = {
        "model_ema." + ("diffusion_model." + k).replace(".", ""): v + 1
        for k, v in bundle.unet.state_dict().items()
    }
    save_file({**sd, **ema}, tmp_path / "m.safetensors")
    plain = load(tmp_path / "m.safetensors", compute_hash=False)
    with_ema = load(tmp_path / "m.safetensors", use_ema=True, compute_hash=False)
    key = "out.2.weight"
    assert torch.equal(plain.unet.state_dict()[key], bundle.unet.state_dict()[key])
    assert torch.equal(with_ema.unet.state_dict()[key], bundle.unet.state_dict()[key] + 1)


def test_unknown_architecture_lists_families(tmp_path):
    bundle = StableDiffusion.from_family(replace(TINY, unet=UNetConfig(model_channels=64)))
    sd = to_single_file_state_dict(
        bundle.unet.state_dict(), bundle.vae.state_dict(), bundle.text_encoder.state_dict(), TINY
    )
    save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(UnknownArchitectureError, match=r"odd\.safetensors.*known families: sd1"):
        load(tmp_path / "odd.safetensors")


def test_not_a_diffusion_checkpoint(tmp_path):
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.safetensors")
    with pytest.raises(UnknownArchitectureError, match="not an SD"):
        load(tmp_path / "resnet.safetensors")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    bundle = StableDiffusion.from_family(TINY)
    sd = to_single_file_state_dict(
        bundle.unet.state_dict(), bundle.vae.state_dict(), bundle.text_encoder.state_dict(), TINY
    )
    del sd["first_stage_model.decoder.conv_out.weight"]
    sd["first_stage_model.decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(KeyMismatchError) as info:
        load(tmp_path / "broken.safetensors")
    message = str(info.value)
    assert "broken.safetensors" in message and "'tiny'" in message
    assert "1 missing: decoder.conv_out.weight" in message
    assert "1 unexpected: decoder.extra.weight" in message


def test_standalone_vae_swap(tmp_path):
    bundle = StableDiffusion.from_family(TINY)
    _save(bundle, tmp_path / "m.safetensors")
    other = StableDiffusion.from_family(TINY)
    save_file(other.vae.state_dict(), tmp_path / "vae.safetensors")
    prefixed = {"first_stage_model." + k: v for k, v in other.vae.state_dict().items()}
    torch.save({"state_dict": prefixed}, tmp_path / "vae.ckpt")
    for vae_file in ("vae.safetensors", "vae.ckpt"):
        loaded = load(tmp_path / "m.safetensors", vae=tmp_path / vae_file, compute_hash=False)
        for key, value in other.vae.state_dict().items():
            assert torch.equal(loaded.vae.state_dict()[key], value)
        assert loaded.vae_name == vae_file and loaded.vae_hash is None  # no hash asked for


def test_a_whole_checkpoint_as_vae_gives_its_first_stage(tmp_path):
    """`--vae OTHER_MODEL.safetensors`: the other model's VAE, its U-Net and text encoder left out."""
    bundle, other = StableDiffusion.from_family(TINY), StableDiffusion.from_family(TINY)
    _save(bundle, tmp_path / "m.safetensors")
    _save(other, tmp_path / "other.safetensors")
    loaded = load(tmp_path / "m.safetensors", vae=tmp_path / "other.safetensors", compute_hash=False)
    for key, value in other.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[key], value), key
    for key, value in bundle.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


def test_swapped_vae_name_and_a1111_hash(tmp_path):
    """A1111 (`modules/sd_vae.py`): "VAE" is the file's base name, "VAE hash" sha256(file)[:10]."""
    import hashlib

    bundle = StableDiffusion.from_family(TINY)
    _save(bundle, tmp_path / "m.safetensors")
    save_file(StableDiffusion.from_family(TINY).vae.state_dict(), tmp_path / "ft-mse.vae.safetensors")
    own = load(tmp_path / "m.safetensors")
    assert (own.vae_name, own.vae_hash) == (None, None)
    vae_file = tmp_path / "ft-mse.vae.safetensors"
    loaded = load(tmp_path / "m.safetensors", vae=vae_file)
    assert loaded.vae_name == "ft-mse.vae.safetensors"
    assert loaded.vae_hash == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]


def test_wrong_vae_is_a_clear_error(tmp_path):
    bundle = StableDiffusion.from_family(TINY)
    _save(bundle, tmp_path / "m.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(KeyMismatchError, match="standalone VAE"):
        load(tmp_path / "m.safetensors", vae=tmp_path / "vae.safetensors")
