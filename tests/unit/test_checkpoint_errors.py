"""Broken model files a user can bring: each is one `error:` line naming the file, exit 2, no traceback."""

import json

import pytest
import torch

from latentforge import cli
from latentforge.checkpoints.diffusers_folder import save_diffusers_folder
from latentforge.checkpoints.exports import save_vae
from latentforge.checkpoints.metadata import METADATA_FAMILY, METADATA_VAE_CONFIG
from latentforge.checkpoints.reading import read_state_dict
from latentforge.checkpoints.single_file import save_single_file
from latentforge.checkpoints.writing import save_safetensors
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY


def _tiny_parts():
    model = StableDiffusion.from_family(TINY)
    return model, (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())


def _folder(tmp_path):
    _, parts = _tiny_parts()
    return save_diffusers_folder(tmp_path / "model", *parts, TINY)


def _break_json(path, text="{not json"):
    path.write_text(text)


def _error_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("file", "text", "expected"),
    [
        ("unet/config.json", "{not json", "unet/config.json: not valid JSON"),
        ("vae/config.json", "[1, 2]", "vae/config.json: expected a JSON object"),
        ("vae/config.json", '{"in_channels": 3}', "vae/config.json: not an SD 1.x/2.x component config"),
        ("text_encoder/config.json", '{"vocab_size": "many"}', "text_encoder/config.json: not an SD 1.x/2.x"),
        ("scheduler/scheduler_config.json", "\xff\xfe", "scheduler_config.json: not valid JSON"),
        ("tokenizer/special_tokens_map.json", "nope", "special_tokens_map.json: not valid JSON"),
    ],
)
def test_broken_diffusers_config(tmp_path, capsys, file, text, expected):
    root = _folder(tmp_path)
    _break_json(root / file, text)
    assert expected in _error_line(capsys, ["info", str(root)])


def test_broken_family_metadata(tmp_path, capsys):
    _, parts = _tiny_parts()
    path = tmp_path / "m.safetensors"
    save_single_file(path, *parts, TINY)
    tensors, metadata = read_state_dict(path)
    save_safetensors(path, tensors, {**metadata, METADATA_FAMILY: '{"name": "x", "unet": 3}'})
    assert "unreadable 'latentforge.family' metadata" in _error_line(capsys, ["info", str(path)])


def test_use_ema_without_ema_weights(tmp_path):
    from latentforge.checkpoints.errors import CheckpointError
    from latentforge.model import load

    _, parts = _tiny_parts()
    save_single_file(tmp_path / "pruned.safetensors", *parts, TINY)
    with pytest.raises(CheckpointError, match=r"pruned.safetensors: use_ema: EMA weights exist for 0 of"):
        load(tmp_path / "pruned.safetensors", use_ema=True)


def test_broken_export_config_metadata(tmp_path):
    from latentforge.checkpoints.errors import CorruptCheckpointError
    from latentforge.checkpoints.exports import load_vae

    model, _ = _tiny_parts()
    path = tmp_path / "vae.safetensors"
    save_vae(model.vae, path)
    tensors, metadata = read_state_dict(path)
    save_safetensors(path, tensors, {**metadata, METADATA_VAE_CONFIG: json.dumps({"ch": 8, "colour": 1})})
    with pytest.raises(CorruptCheckpointError, match="vae.safetensors: unreadable 'latentforge.vae_config'"):
        load_vae(path)
    assert torch.equal(
        load_vae(path, model.vae.config).state_dict()["encoder.conv_in.weight"],
        model.vae.state_dict()["encoder.conv_in.weight"],
    )
