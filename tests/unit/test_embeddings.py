"""Textual-inversion embedding files: every layout read, A1111's written, nothing executed."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latentforge.checkpoints.embeddings import find_embeddings, read_embedding, write_embedding
from latentforge.checkpoints.errors import (
    CorruptCheckpointError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
)
from latentforge.checkpoints.hashing import sha256_file


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_write_then_read_round_trip(tmp_path, suffix):
    vectors = torch.randn(3, 32)
    path = write_embedding(tmp_path / f"Style{suffix}", "style-trained", vectors, step=120)
    emb = read_embedding(path)
    assert emb.name == "Style" and emb.stored_name == "style-trained" and emb.step == 120
    assert torch.equal(emb.vectors, vectors) and emb.count == 3 and emb.width == 32
    assert emb.hash == sha256_file(path)[:12]


def test_pt_layout_is_a1111s(tmp_path):
    """The exact dict A1111's `Embedding.save` writes, readable with weights_only=True."""
    path = write_embedding(tmp_path / "x.pt", "x", torch.ones(2, 8), step=5, checkpoint_hash="abcd1234")
    data = torch.load(path, weights_only=True)
    assert set(data) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert data["string_to_token"] == {"*": 265} and data["string_to_param"]["*"].shape == (2, 8)
    assert data["name"] == "x" and data["step"] == 5 and data["sd_checkpoint"] == "abcd1234"


def test_safetensors_layout_is_emb_params(tmp_path):
    path = write_embedding(tmp_path / "x.safetensors", "x", torch.ones(8), dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (1, 8)
        assert f.get_tensor("emb_params").dtype == torch.float16 and f.metadata()["name"] == "x"


def test_reads_torch_1_11_parameter_dict(tmp_path):
    """Old A1111 files pickle `string_to_param` as an nn.ParameterDict (A1111's `_parameters` fix)."""
    vec = torch.randn(2, 16)
    data = {"string_to_param": nn.ParameterDict({"*": nn.Parameter(vec)}), "name": "old", "step": 7}
    torch.save(data, tmp_path / "old.pt")
    emb = read_embedding(tmp_path / "old.pt")
    assert torch.equal(emb.vectors, vec) and emb.step == 7


def test_reads_diffusers_concepts_and_kohya(tmp_path):
    vec = torch.randn(16)
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": torch.randn(2, 16)}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"emb_params": torch.randn(4, 16)}, tmp_path / "kohya.pt")
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.bin").vectors, vec[None])
    assert read_embedding(tmp_path / "learned_embeds.safetensors").count == 2
    assert read_embedding(tmp_path / "kohya.pt").count == 4


def test_sdxl_embedding_kept_and_sized_as_a1111(tmp_path):
    save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors")
    )
    emb = read_embedding(tmp_path / "xl.safetensors")
    assert emb.width == 2048 and emb.family == "SDXL" and set(emb.sdxl) == {"clip_l", "clip_g"}
    path = write_embedding(tmp_path / "xl2.safetensors", "xl2", dict(emb.sdxl))
    assert torch.equal(read_embedding(path).sdxl["clip_g"], emb.sdxl["clip_g"])


def test_bad_files_refused(tmp_path):
    torch.save({"a": torch.randn(2, 8), "b": torch.randn(2, 8)}, tmp_path / "two.bin")
    with pytest.raises(UnknownArchitectureError, match="2 terms"):
        read_embedding(tmp_path / "two.bin")
    torch.save({"emb_params": torch.tensor([[1.0, float("nan")]])}, tmp_path / "nan.pt")
    with pytest.raises(CorruptCheckpointError, match="NaN"):
        read_embedding(tmp_path / "nan.pt")
    good = write_embedding(tmp_path / "t.safetensors", "t", torch.randn(4, 8))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError):
        read_embedding(tmp_path / "cut.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_code_never_runs(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": _Evil()}}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        read_embedding(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


def test_find_embeddings_by_stem_first_folder_wins(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for p in (
        tmp_path / "a" / "sub" / "Neg.pt",
        tmp_path / "b" / "Neg.safetensors",
        tmp_path / "b" / "x.txt",
    ):
        p.write_bytes(b"")
    found = find_embeddings([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])
    assert found == {"Neg": tmp_path / "a" / "sub" / "Neg.pt"}
