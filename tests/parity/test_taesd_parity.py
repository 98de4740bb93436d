"""TAESD: our TinyAutoencoder against diffusers' AutoencoderTiny on tiny random weights, loaded through
every published layout (diffusers file/folder, madebyollin's split .pth/.safetensors, ComfyUI's prefixes)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from latentforge.checkpoints.errors import CheckpointError
from latentforge.checkpoints.taesd import diffusers_key, read_taesd
from latentforge.models.taesd import TAESD, TinyAutoencoder, TinyAutoencoderConfig

TINY = {"encoder_block_out_channels": (8, 8, 8), "decoder_block_out_channels": (8, 8, 8)}
BLOCKS = {"num_encoder_blocks": (1, 2, 2), "num_decoder_blocks": (2, 2, 1)}


@pytest.fixture(scope="module")
def reference() -> AutoencoderTiny:
    torch.manual_seed(0)
    model = AutoencoderTiny(**TINY, **BLOCKS).eval()
    with torch.no_grad():  # default init gives near-constant outputs through 5 ReLU blocks; widen it
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _check(ours: TinyAutoencoder, reference: AutoencoderTiny, encoder: bool = True) -> None:
    expected_config = TinyAutoencoderConfig(4, 8, (1, 2, 2), (2, 2, 1))
    assert ours.config == expected_config or (not encoder and ours.config.decoder_blocks == (2, 2, 1))
    z = torch.randn(2, 4, 5, 3) * 2
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        decoded, expected = ours.decode(z), reference.decode(z).sample
        assert decoded.shape == (2, 3, 20, 12) and decoded.std() > 0.05
        torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)
        if encoder:
            torch.testing.assert_close(ours.encode(x), reference.encode(x).latents, atol=1e-5, rtol=1e-5)


def test_diffusers_file_and_folder(reference, tmp_path):
    save_file(reference.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    _check(read_taesd(tmp_path), reference)
    _check(read_taesd(tmp_path / "diffusion_pytorch_model.safetensors"), reference)


def test_published_split_files_and_comfyui_prefix(reference, tmp_path):
    ours = read_taesd(_diffusers_folder(reference, tmp_path / "d"))
    state = ours.state_dict()
    bare = {
        part: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part)}
        for part in ("encoder", "decoder")
    }
    (tmp_path / "pth").mkdir()
    torch.save(bare["decoder"], tmp_path / "pth" / "taesdxl_decoder.pth")  # read with weights_only
    torch.save(bare["encoder"], tmp_path / "pth" / "taesdxl_encoder.pth")
    _check(read_taesd(tmp_path / "pth", variant="taesdxl"), reference)
    (tmp_path / "st").mkdir()
    save_file(bare["decoder"], tmp_path / "st" / "taesd_decoder.safetensors")
    decoder_only = read_taesd(tmp_path / "st")
    assert decoder_only.encoder is None
    _check(decoder_only, reference, encoder=False)
    save_file({f"taesd_{k}": v for k, v in state.items()}, tmp_path / "comfy.safetensors")
    _check(read_taesd(tmp_path / "comfy.safetensors"), reference)


def _diffusers_folder(reference: AutoencoderTiny, folder):  # noqa: ANN001, ANN202
    folder.mkdir()
    save_file(reference.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_full_size_keys_match_diffusers():
    with torch.device("meta"):
        ours = TinyAutoencoder(TAESD)
        theirs = AutoencoderTiny()
    assert {diffusers_key(k): v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="taesd_decoder.pth"):
        read_taesd(tmp_path)
    save_file({"encoder.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no TAESD decoder"):
        read_taesd(tmp_path / "x.safetensors")
