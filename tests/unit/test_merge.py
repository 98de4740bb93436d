"""Checkpoint merges against an independent computation on tiny random models, and their refusals.

The expected tensors are computed here in float64 from `safetensors.torch.load_file` of the inputs, with
A1111's formulas (`modules/extras.py`): (1 - a) A + a B, A + a (B - C).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.checkpoints.errors import CorruptCheckpointError
from latentforge.checkpoints.hashing import sha256_file
from latentforge.checkpoints.lora import apply_loras
from latentforge.checkpoints.lora_writing import kohya_targets, save_kohya_lora
from latentforge.checkpoints.merge import LoraSpec, MergeMismatchError, merge_checkpoints, read_recipe
from latentforge.checkpoints.merge_blocks import BLOCK_IDS, block_of, parse_block_weights, preset_names
from latentforge.checkpoints.single_file import save_single_file
from latentforge.errors import OutputError, ParameterError
from latentforge.model import StableDiffusion, load
from latentforge.models.families import TINY, TINY_SD2
from references import random_lora_factors

TINY_INPAINT = replace(TINY, name="tiny-inpaint", unet=replace(TINY.unet, in_channels=9))


def _write(path, family, seed, ema: bool = False):  # noqa: ANN001, ANN202
    torch.manual_seed(seed)
    model = StableDiffusion.from_family(family)
    unet = model.unet.state_dict()
    save_single_file(path, unet, model.vae.state_dict(), model.text_encoder.state_dict(), family)
    if ema:  # LDM's EMA copies: `model_ema.diffusion_model<key without dots>`, plus two bookkeeping scalars
        tensors, metadata = load_file(path), safe_open(path, "pt").metadata()
        generator = torch.Generator().manual_seed(seed + 100)
        for key, value in unet.items():
            tensors["model_ema.diffusion_model" + key.replace(".", "")] = torch.randn(
                value.shape, generator=generator
            )
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(1000 + seed, dtype=torch.int32)
        save_file(tensors, path, metadata)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("merge")
    return {
        "a": _write(root / "a.safetensors", TINY, 0),
        "b": _write(root / "b.safetensors", TINY, 1),
        "c": _write(root / "c.safetensors", TINY, 2),
        "a_ema": _write(root / "a_ema.safetensors", TINY, 3, ema=True),
        "b_ema": _write(root / "b_ema.safetensors", TINY, 4, ema=True),
        "inpaint": _write(root / "inpaint.safetensors", TINY_INPAINT, 5),
        "sd2": _write(root / "sd2.safetensors", TINY_SD2, 6),
        "sd2_b": _write(root / "sd2_b.safetensors", TINY_SD2, 7),
    }


def _expected(a: torch.Tensor, b: torch.Tensor, alpha: float, c: torch.Tensor | None = None) -> torch.Tensor:
    a, b = a.double(), b.double()
    if c is None:
        return ((1 - alpha) * a + alpha * b).float()
    return (a + alpha * (b - c.double())).float()


def _no_leftovers(folder) -> None:  # noqa: ANN001
    assert not [p for p in folder.iterdir() if p.name.startswith("out")], list(folder.iterdir())


@pytest.mark.parametrize("mode", ["weighted_sum", "add_difference"])
def test_formulas_equal_an_independent_computation(files, tmp_path, mode):
    inputs = [files["a"], files["b"]] + ([files["c"]] if mode == "add_difference" else [])
    result = merge_checkpoints(tmp_path / "out.safetensors", *inputs, mode=mode, alpha=0.3)
    a, b, c = (load_file(files[k]) for k in "abc")
    out = load_file(result.path)
    assert set(out) == set(a)
    for key, value in out.items():
        third = c[key] if mode == "add_difference" else None
        expected = _expected(a[key], b[key], 0.3, third) if "model" in key else a[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6, msg=key)


def test_mbw_with_every_block_at_alpha_equals_weighted_sum(files, tmp_path):
    plain = merge_checkpoints(tmp_path / "out1.safetensors", files["a"], files["b"], alpha=0.35)
    weights = dict.fromkeys(BLOCK_IDS, 0.35)
    blocks = merge_checkpoints(tmp_path / "out2.safetensors", files["a"], files["b"], block_weights=weights)
    one, two = load_file(plain.path), load_file(blocks.path)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_block_weights_go_where_supermerger_puts_them(files, tmp_path):
    weights = {block: i / 40 for i, block in enumerate(BLOCK_IDS)}
    result = merge_checkpoints(tmp_path / "out.safetensors", files["a"], files["b"], block_weights=weights)
    a, b, out = load_file(files["a"]), load_file(files["b"]), load_file(result.path)
    unet = "model.diffusion_model."
    expected_blocks = {
        unet + "time_embed.0.weight": "IN00",
        unet + "input_blocks.0.0.weight": "IN00",
        unet + "input_blocks.1.1.proj_in.weight": "IN01",
        unet + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": "M00",
        unet + "output_blocks.2.0.in_layers.2.weight": "OUT02",
        unet + "out.2.weight": "OUT11",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": "BASE",
        "first_stage_model.decoder.conv_out.weight": "BASE",
    }
    for key, block in expected_blocks.items():
        assert block_of(key) == block
        torch.testing.assert_close(out[key], _expected(a[key], b[key], weights[block]), rtol=1e-6, atol=1e-6)


def test_block_ids_and_presets():
    assert len(BLOCK_IDS) == 26 and BLOCK_IDS[0] == "BASE" and BLOCK_IDS[13] == "M00"
    assert block_of("model.diffusion_model.input_blocks.11.0.out_layers.3.weight") == "IN11"
    assert block_of("model.diffusion_model.output_blocks.11.1.proj_out.bias") == "OUT11"
    assert len(preset_names()) == 38
    # values as in supermerger's scripts/mbwpresets_master.txt (commit 2e92b87)
    quoted = {
        ("GRAD_V", "IN01"): 0.9166666667,
        ("SMOOTHSTEP", "IN01"): 0.00506365740740741,
        ("SMOOTHSTEP*3", "OUT02"): 0.0507812500000004,
        ("R_SMOOTHSTEP/2", "IN04"): 0.740740740740741,
        ("COSINE", "OUT11"): 0.0,
        ("TRUE_CUBIC_HERMITE", "IN02"): 0.325761959876543,
        ("FAKE_REVERSE_CUBIC_HERMITE", "IN03"): 0.615234375,
        ("RING08_SOFT", "IN09"): 0.5,
        ("WRAP12", "OUT06"): 1.0,
        ("OUT12_5", "M00"): 0.5,
        ("ALL_B", "BASE"): 1.0,
    }
    for (name, block), value in quoted.items():
        assert parse_block_weights(name)[block] == pytest.approx(value, abs=1e-10), (name, block)
    assert parse_block_weights(",".join(["0.5"] * 26)) == dict.fromkeys(BLOCK_IDS, 0.5)
    for bad in ("NOPE", "0.5,0.5", ",".join(["x"] * 26), ",".join(["nan"] * 26)):
        with pytest.raises(ParameterError):
            parse_block_weights(bad)


def test_inpainting_a_merges_its_first_four_input_channels(files, tmp_path):
    result = merge_checkpoints(tmp_path / "out.safetensors", files["inpaint"], files["b"], alpha=0.6)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    a, b, out = load_file(files["inpaint"]), load_file(files["b"]), load_file(result.path)
    assert out[key].shape[1] == 9 and result.recipe["is_inpainting"]
    torch.testing.assert_close(out[key][:, :4], _expected(a[key][:, :4], b[key], 0.6), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[key][:, 4:], a[key][:, 4:])
    with pytest.raises(MergeMismatchError, match="A must be the inpainting model"):
        merge_checkpoints(tmp_path / "out2.safetensors", files["b"], files["inpaint"])
    assert not (tmp_path / "out2.safetensors").exists()


def test_dtype_and_ema_choices(files, tmp_path):
    a, b = load_file(files["a_ema"]), load_file(files["b_ema"])
    dropped = load_file(
        merge_checkpoints(
            tmp_path / "drop.safetensors", files["a_ema"], files["b_ema"], dtype=torch.float16
        ).path
    )
    assert not any(k.startswith("model_ema.") for k in dropped)
    assert {v.dtype for v in dropped.values() if v.is_floating_point()} == {torch.float16}
    kept = load_file(
        merge_checkpoints(tmp_path / "keep.safetensors", files["a_ema"], files["b_ema"], ema="keep").path
    )
    key = "model_ema.diffusion_modelinput_blocks11proj_inweight"
    torch.testing.assert_close(kept[key], _expected(a[key], b[key], 0.5))
    assert torch.equal(kept["model_ema.num_updates"], a["model_ema.num_updates"])  # integers are never merged
    used = load_file(
        merge_checkpoints(tmp_path / "use.safetensors", files["a_ema"], files["b_ema"], ema="use").path
    )
    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    torch.testing.assert_close(used[unet], _expected(a[key], b[key], 0.5))
    assert not any(k.startswith("model_ema.") for k in used)
    with pytest.raises(MergeMismatchError, match="no EMA copy"):
        merge_checkpoints(tmp_path / "out.safetensors", files["a"], files["b"], ema="use")
    _no_leftovers(tmp_path)


def test_bake_vae_and_discard(files, tmp_path):
    vae = tmp_path / "vae.safetensors"
    c = load_file(files["c"])
    save_file(
        {k.removeprefix("first_stage_model."): v for k, v in c.items() if k.startswith("first_stage_model.")},
        vae,
    )
    out = load_file(
        merge_checkpoints(tmp_path / "baked.safetensors", files["a"], files["b"], bake_vae=vae).path
    )
    assert all(torch.equal(out[k], v) for k, v in c.items() if k.startswith("first_stage_model."))
    pruned = load_file(
        merge_checkpoints(
            tmp_path / "pruned.safetensors", files["a"], files["b"], discard=r"^cond_stage_model\."
        ).path
    )
    assert not any(k.startswith("cond_stage_model.") for k in pruned) and any(
        k.startswith("model.") for k in pruned
    )
    with pytest.raises(Exception, match="VAE"):
        merge_checkpoints(tmp_path / "out.safetensors", files["a"], files["b"], bake_vae=files["sd2"])
    _no_leftovers(tmp_path)


def test_recipe_hash_and_the_output_loads(files, tmp_path):
    result = merge_checkpoints(tmp_path / "out.safetensors", files["a"], files["b"], alpha=0.25)
    assert result.sha256 == sha256_file(result.path) and result.short_hash == result.sha256[:10]
    recipe = read_recipe(result.path)
    assert recipe == result.recipe
    assert recipe["primary_model_hash"] == sha256_file(files["a"]) and recipe["multiplier"] == 0.25
    assert recipe["interp_method"] == "Weighted sum"
    with safe_open(result.path, "pt") as f:
        models = json.loads(f.metadata()["sd_merge_models"])
    assert models[sha256_file(files["b"])]["name"] == "b"
    merged = load(result.path)
    assert merged.family.name == "tiny" and merged.short_hash == result.short_hash
    with pytest.raises(OutputError, match="exists"):
        merge_checkpoints(result.path, files["a"], files["b"])
    again = merge_checkpoints(result.path, files["a"], files["b"], alpha=0.25, overwrite=True)
    assert again.sha256 == result.sha256  # deterministic


@pytest.mark.parametrize("family_files", [("a", TINY), ("sd2", TINY_SD2)], ids=["sd1-layout", "sd2-layout"])
def test_lora_into_checkpoint_equals_applying_it(files, tmp_path, family_files):
    name, family = family_files
    factors = random_lora_factors(family, kohya_targets(family, conv=True), seed=3)
    first = save_kohya_lora(tmp_path / "l1.safetensors", factors, family)
    second = save_kohya_lora(
        tmp_path / "l2.safetensors", random_lora_factors(family, kohya_targets(family)[:5], seed=4), family
    )
    specs = [LoraSpec(first, 0.7, 0.4), LoraSpec(second, -0.5)]
    result = merge_checkpoints(tmp_path / "out.safetensors", files[name], mode="none", loras=specs)
    assert [entry["unet"] for entry in result.recipe["loras"]] == [0.7, -0.5]
    merged = load(result.path)
    reference = load(files[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_loras(reference, [(first, 0.7, 0.4), (second, -0.5, None)], bake=True)
    for part in ("unet", "text_encoder", "vae"):
        mine, theirs = getattr(merged, part).state_dict(), getattr(reference, part).state_dict()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-6, atol=1e-6, msg=f"{part}.{key}")


def test_bad_input_is_refused_and_leaves_no_file(files, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeMismatchError, match="only checkpoints of one family"):
        merge_checkpoints(out, files["a"], files["sd2"])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["b"].read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        merge_checkpoints(out, files["a"], truncated)
    nan = load_file(files["b"])
    nan["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors", safe_open(files["b"], "pt").metadata())
    with pytest.raises(CorruptCheckpointError, match="NaN"):
        merge_checkpoints(out, files["a"], tmp_path / "nan.safetensors")
    with pytest.raises(ParameterError, match="takes 3"):
        merge_checkpoints(out, files["a"], files["b"], mode="add_difference")
    with pytest.raises(ParameterError, match=".safetensors"):
        merge_checkpoints(tmp_path / "out.ckpt", files["a"], files["b"])
    with pytest.raises(MergeMismatchError):
        merge_checkpoints(out, files["sd2"], files["sd2_b"], files["a"], mode="add_difference")
    with pytest.raises(ParameterError, match="regular expression"):
        merge_checkpoints(out, files["a"], files["b"], discard="model(")
    with pytest.raises(ParameterError, match="exactly the ids"):
        merge_checkpoints(out, files["a"], files["b"], block_weights={"BASE": 1.0})
    with pytest.raises(ParameterError, match="ema"):
        merge_checkpoints(out, files["a"], files["b"], ema="both")  # type: ignore[arg-type]
    _no_leftovers(tmp_path)


def test_cli_merge_prints_the_hash_and_info_prints_the_recipe(files, tmp_path, capsys):
    from latentforge.cli import main

    out = tmp_path / "out.safetensors"
    argv = [
        "merge",
        str(files["a"]),
        str(files["b"]),
        "-o",
        str(out),
        "--blocks",
        "GRAD_V",
        "--dtype",
        "fp16",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model hash: {sha256_file(out)[:10]}" in printed
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '  interp_method: "Weighted sum"' in printed and '"IN01": 0.9166666666666666' in printed
    assert f"hash: {sha256_file(out)[:10]}" in printed and "family: tiny" in printed
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently


def test_cli_lora_strengths_follow_a1111_tag_order():
    from latentforge.cli import _parse_lora

    assert _parse_lora("detail.safetensors") == ("detail.safetensors", 1.0, 1.0)
    assert _parse_lora("detail.safetensors:0.8") == ("detail.safetensors", 0.8, 0.8)
    assert _parse_lora("detail.safetensors:0.3:0.5") == ("detail.safetensors", 0.5, 0.3)  # te, then unet
    assert _parse_lora("C:/models/x.v2.safetensors:-1") == ("C:/models/x.v2.safetensors", -1.0, -1.0)


def test_ckpt_inputs_merge_like_safetensors(files, tmp_path):
    b = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(files["b"])}, b)  # Lightning's layout, zip format
    from_ckpt = merge_checkpoints(tmp_path / "out1.safetensors", files["a"], b, alpha=0.4)
    plain = merge_checkpoints(tmp_path / "out2.safetensors", files["a"], files["b"], alpha=0.4)
    one, two = load_file(from_ckpt.path), load_file(plain.path)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
