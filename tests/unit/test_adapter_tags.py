"""`<lora:>` tags and embeddings in generation: parsing (A1111's rules), resolution, exact undo, infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentforge.checkpoints.embeddings import write_embedding
from latentforge.checkpoints.errors import CheckpointError
from latentforge.checkpoints.lora import UnknownLoraError, apply_loras, lora_short_hash
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest, resolve
from latentforge.pipelines.request_infotext import from_infotext
from latentforge.pipelines.runner import run
from latentforge.prompts.conditioning import EmbeddingVocabulary, tokenize_weighted
from latentforge.prompts.extra_networks import LoraTag, lora_tags, strip_extra_networks

TO_Q = "input_blocks.1.1.transformer_blocks.0.attn2.to_q"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def test_tag_parsing_follows_a1111():
    """A1111: <lora:name:te:unet>, unet defaults to te, te= / unet= override, lyco is an alias."""
    tags, other = lora_tags("a <lora:x> b <lora:y:0.5> <lyco:z:0.3:0.9> <lora:w:1:unet=0.2> <hypernet:h:1>")
    assert tags == [LoraTag("x", 1, 1), LoraTag("y", 0.5, 0.5), LoraTag("z", 0.3, 0.9), LoraTag("w", 1, 0.2)]
    assert other == ["<hypernet:h:1>"]
    assert strip_extra_networks("a <lora:x:1>, [b<lora:y:2>:c:3]") == "a , [b:c:3]"
    for bad in ("<lora:x:abc>", "<lora:x:nan>", "<lora:x:1:1:4>", "<lora:x:dyn=4>", "<lora: :1>"):
        with pytest.raises(ParameterError):
            lora_tags(bad)


def kohya_lora(model: StableDiffusion, path: Path, seed: int = 1, values: float | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, width in (
        (f"lora_unet_{TO_Q.replace('.', '_')}", 32),
        (f"lora_te_{TE_Q.replace('.', '_')}", 32),
    ):
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(4, width, generator=g) * 0.5
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(width, 4, generator=g) * 0.5
        tensors[f"{prefix}.alpha"] = torch.tensor(2.0)
    if values is not None:
        tensors = {k: torch.full_like(v, values) for k, v in tensors.items()}
    save_file(tensors, path)
    return path


@pytest.fixture
def model(tmp_path) -> StableDiffusion:
    torch.manual_seed(0)
    m = StableDiffusion.from_family(TINY).eval()
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    (tmp_path / "embeddings").mkdir()
    kohya_lora(m, tmp_path / "models" / "Lora" / "Style.safetensors")
    write_embedding(tmp_path / "embeddings" / "Neg.pt", "Neg", torch.randn(2, 32) * 3)
    write_embedding(tmp_path / "embeddings" / "Wide.pt", "Wide", torch.randn(1, 48))  # another family
    with pytest.warns(UserWarning, match="Wide.*width 48"):
        m.use_folders(models_dir=tmp_path / "models")
    return m


def weights(model: StableDiffusion) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.clone()
        for c in ("unet", "text_encoder")
        for k, v in getattr(model, c).state_dict().items()
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def gen(model: StableDiffusion, prompt: str, **kw) -> tuple[torch.Tensor, str]:
    request = GenerationRequest(prompt=prompt, steps=2, seed=3, width=32, height=32, sampler="Euler", **kw)
    (result,) = run(model, request, progress=False)
    return torch.tensor(np.array(result.image), dtype=torch.float32), result.infotext


def test_tag_applies_then_undoes_exactly_and_writes_hashes(model, tmp_path):
    before = weights(model)
    plain, _ = gen(model, "a cat")
    tagged, info = gen(model, "a cat <lora:Style:0.8>")
    assert not torch.equal(plain, tagged)
    assert same(weights(model), before)  # undone bit for bit
    h = lora_short_hash(tmp_path / "models" / "Lora" / "Style.safetensors")
    assert f'Lora hashes: "Style: {h}"' in info and "<lora:Style:0.8>" in info.splitlines()[0]
    # the same image through the Python API: tags are just text removed before the text encoder
    with model.lora(tmp_path / "models" / "Lora" / "Style.safetensors", 0.8):
        by_hand, _ = gen(model, "a cat")
    assert torch.equal(by_hand, tagged) and same(weights(model), before)


def test_weight_zero_tag_equals_no_tag(model):
    assert torch.equal(gen(model, "a cat <lora:Style:0>")[0], gen(model, "a cat")[0])


def test_same_lora_twice_at_half_equals_baked_once_at_one(model, tmp_path):
    """Each tag is one application (A1111 loads the network per mention): the two updates add up."""
    path = tmp_path / "models" / "Lora" / "Style.safetensors"
    before = weights(model)
    with apply_loras(model, [(path, 0.5, None), (path, 0.5, None)]):
        twice = weights(model)
    apply_loras(model, [(path, 1.0, None)], bake=True)
    once = weights(model)
    assert not same(once, before)
    for key in once:
        torch.testing.assert_close(twice[key], once[key], rtol=1e-6, atol=1e-6)
    model_twice, _ = gen(model, "a cat")  # baked at 1 == the two half tags on the unpatched model:
    apply_loras(model, [(path, -1.0, None)], bake=True)  # (-1 brings it back to within fp32 rounding)
    tags, _ = gen(model, "a cat <lora:Style:0.5> <lora:Style:0.5>")
    assert (model_twice - tags).abs().max() <= 1  # 8-bit images of weights equal to 1e-6


def test_unknown_tag_names_the_name_and_folders(model, tmp_path):
    before = weights(model)
    with pytest.raises(UnknownLoraError, match=r"'Nope'.*Lora"):
        gen(model, "a <lora:Nope:1>")
    assert same(weights(model), before)


@pytest.mark.parametrize("kind", ["nan", "truncated", "other-family"])
def test_bad_lora_file_clear_error_model_unchanged(model, tmp_path, kind):
    path = tmp_path / "models" / "Lora" / "Bad.safetensors"
    if kind == "nan":
        kohya_lora(model, path, values=float("nan"))
    elif kind == "truncated":
        data = kohya_lora(model, path).read_bytes()
        path.write_bytes(data[:-40])
    else:  # an SD2 LoRA: cross-attention keys of context width 1024
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        save_file(
            {f"{key}.lora_down.weight": torch.ones(4, 1024), f"{key}.lora_up.weight": torch.ones(320, 4)},
            path,
        )
    before = weights(model)
    with pytest.raises(CheckpointError) as error:
        gen(model, "a cat <lora:Style:1> <lora:Bad:1>")
    assert "Bad.safetensors" in str(error.value)
    if kind == "other-family":
        assert "SD2" in str(error.value)
    assert same(weights(model), before)


def test_error_during_generation_undoes(model, monkeypatch):
    before = weights(model)
    import latentforge.pipelines.runner as runner

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(runner, "sample_latents", boom)
    with pytest.raises(RuntimeError):
        gen(model, "a <lora:Style:1>")
    assert same(weights(model), before)


def test_from_png_resolves_by_hash_and_names_missing(model, tmp_path):
    _, info = gen(model, "a cat <lora:Style:1>")
    asked = from_infotext(info).request
    assert "Lora hashes" not in asked.extra and asked.lora_hashes
    # renamed file: found by its hash
    lora = tmp_path / "models" / "Lora" / "Style.safetensors"
    lora.rename(lora.with_name("Renamed.safetensors"))
    model.lora_hashes.clear()
    resolved = resolve(asked, model)
    assert resolved.batches[0].loras[0].path.name == "Renamed.safetensors"
    lora.with_name("Renamed.safetensors").unlink()
    with pytest.raises(UnknownLoraError, match=asked.lora_hashes.split(": ")[1]):
        resolve(asked, model)


def test_negative_prompt_tags_removed_with_a_warning(model):
    with pytest.warns(UserWarning, match="negative prompt"):
        with_tag, _ = gen(model, "a", negative_prompt="ugly <lora:Style:1>")
    assert torch.equal(with_tag, gen(model, "a", negative_prompt="ugly ")[0])


def test_embedding_tokens_and_ti_hashes(model, tmp_path):
    vocab = EmbeddingVocabulary(model.tokenizer, {"Neg": 2})
    (chunk,) = tokenize_weighted(model.tokenizer, "a (Neg:1.2) cat", embeddings=vocab)
    a, cat = model.tokenizer.encode("a")[0], model.tokenizer.encode("cat")[0]
    assert chunk.tokens[:6] == (model.tokenizer.bos_token_id, a, 0, 0, cat, model.tokenizer.eos_token_id)
    assert chunk.fixes == ((2, "Neg"),) and chunk.weights[2:4] == (1.2, 1.2)
    with_emb, info = gen(model, "a cat", negative_prompt="Neg")
    h = model.embeddings["Neg"].hash
    assert f"TI hashes: {'Neg: ' + h!r}".replace("'", '"') in info
    assert not torch.equal(with_emb, gen(model, "a cat", negative_prompt="neg words")[0])


def test_embedding_never_straddles_chunks(model):
    vocab = EmbeddingVocabulary(model.tokenizer, {"Neg": 2})
    chunks = tokenize_weighted(model.tokenizer, "a " * 74 + "Neg", embeddings=vocab)
    assert len(chunks) == 2 and chunks[1].fixes == ((1, "Neg"),)


def test_wrong_width_embedding_refused_when_loaded_by_hand(model, tmp_path):
    with pytest.raises(ParameterError, match="width 48"):
        model.load_embedding(tmp_path / "embeddings" / "Wide.pt")
    assert "Wide" not in model.embeddings and "Neg" in model.embeddings


def test_cli_generate_with_models_dir_and_embeddings_dir(tiny_checkpoint, tmp_path):
    from latentforge.cli import main
    from latentforge.pipelines.infotext import read_infotext

    torch.manual_seed(0)
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    (tmp_path / "emb").mkdir()
    kohya_lora(StableDiffusion.from_family(TINY), tmp_path / "models" / "Lora" / "Style.safetensors")
    write_embedding(tmp_path / "emb" / "Neg.safetensors", "Neg", torch.randn(2, 32))
    argv = ["generate", "a cat <lora:Style:0.7:1>", "-n", "Neg", "--model", str(tiny_checkpoint), "--steps",
            "1", "--size", "32x32", "--out", str(tmp_path / "out"), "--models-dir", str(tmp_path / "models"),
            "--embeddings-dir", str(tmp_path / "emb")]  # fmt: skip
    assert main(argv) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    info = read_infotext(png)
    assert "Lora hashes: " in info and "TI hashes: " in info
    assert main(["generate", "--from-png", str(png), *argv[2:]]) == 0  # the same LoRA found again
