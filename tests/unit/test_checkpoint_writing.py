"""The one safetensors writer: cast on the way out, all or nothing on disk."""

import pytest
import torch

from latentforge.checkpoints import writing
from latentforge.checkpoints.reading import read_state_dict
from latentforge.checkpoints.writing import save_safetensors


def test_writes_cast_tensors_and_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": torch.randn(3, 2), "i": torch.arange(4)}, {"k": "v"}, dtype=torch.float16)
    tensors, metadata = read_state_dict(path)
    assert metadata == {"k": "v"}
    assert tensors["w"].dtype == torch.float16 and tensors["i"].dtype == torch.int64
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"w": torch.ones(2)})
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing.os, "fsync", disk_full)  # fails after the temporary file is written
    with pytest.raises(OSError, match="No space"):
        save_safetensors(path, {"w": torch.zeros(1000)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
