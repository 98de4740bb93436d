"""Bad input never loads silently and never runs pickle code."""

import pathlib

import pytest
import torch
from safetensors.torch import save_file

from latentforge.checkpoints.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotAWeightsFileError,
    UnsafeCheckpointError,
)
from latentforge.checkpoints.reading import read_state_dict


class _WritesAFile:
    """A pickle payload that would create a file if unpickling executed it."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.target, "pwned"))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.safetensors"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_safetensors_round_trip_with_metadata(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half(), "e": torch.zeros(0)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"k": "v"})
    loaded, metadata = read_state_dict(tmp_path / "m.safetensors")
    assert metadata == {"k": "v"}
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_state_dict(path)


def test_garbage_header(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    with pytest.raises(CorruptCheckpointError, match="header"):
        read_state_dict(path)


def test_inconsistent_offsets(tmp_path):
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}'
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CorruptCheckpointError, match="inconsistent"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git-lfs"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "web page"),
        (b"", "empty"),
        (b"\x00\x01\x02 definitely not a model", "not a .safetensors"),
    ],
)
def test_not_a_weights_file(tmp_path, content, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises((NotAWeightsFileError, CorruptCheckpointError), match=match):
        read_state_dict(path)


def test_malicious_pickle_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1), "payload": _WritesAFile(target)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        read_state_dict(path)
    assert not target.exists()


def test_ckpt_with_state_dict_wrapper(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 5}, path)
    tensors, metadata = read_state_dict(path)
    assert metadata == {} and torch.equal(tensors["w"], torch.ones(2))


def test_truncated_ckpt(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError):
        read_state_dict(path)
