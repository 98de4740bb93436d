"""LoRA + LoRA (concatenation, SVD re-rank) and LoRA extraction, checked by applying the results."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentforge.checkpoints.lora import apply_loras
from latentforge.checkpoints.lora_merge import extract_lora, merge_loras
from latentforge.checkpoints.lora_writing import kohya_names, kohya_targets, module_shapes, save_kohya_lora
from latentforge.checkpoints.merge import LoraSpec, MergeMismatchError
from latentforge.checkpoints.single_file import save_single_file
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion, load
from latentforge.models.families import TINY, TINY_SD2
from references import random_lora_factors

UNET, TEXT = "model.diffusion_model.", "cond_stage_model.transformer."


def _weights(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Every U-Net and text-encoder weight by original module name (fp64 copies)."""
    out = {UNET + k: v.double().clone() for k, v in model.unet.state_dict().items()}
    return out | {TEXT + k: v.double().clone() for k, v in model.text_encoder.state_dict().items()}


def _applied(family, loras) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The change of every weight when `loras` [(path, unet, te)] are applied to a random model."""
    torch.manual_seed(0)
    model = StableDiffusion.from_family(family)
    before = _weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_loras(model, loras, bake=True)
    after = _weights(model)
    return {k: after[k] - before[k] for k in before}


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("loras")
    targets = kohya_targets(TINY, conv=True)
    first = save_kohya_lora(
        root / "one.safetensors", random_lora_factors(TINY, targets, seed=1, rank=3), TINY
    )
    # the second overlaps half of the first's modules, at another rank
    second = random_lora_factors(TINY, targets[len(targets) // 2 :], seed=2, rank=2)
    return first, save_kohya_lora(root / "two.safetensors", second, TINY)


@pytest.mark.parametrize("family", [TINY, TINY_SD2], ids=lambda f: f.name)
def test_concatenation_equals_applying_both(tmp_path, family):
    targets = kohya_targets(family, conv=True)
    one = save_kohya_lora(tmp_path / "1.safetensors", random_lora_factors(family, targets, seed=1), family)
    two = save_kohya_lora(
        tmp_path / "2.safetensors", random_lora_factors(family, targets[::2], seed=2, rank=2), family
    )
    result = merge_loras(tmp_path / "out.safetensors", [LoraSpec(one, 0.5, 0.3), LoraSpec(two, -0.8)], family)
    assert result.relative_error < 1e-6 and result.modules == len(targets)
    both = _applied(family, [(one, 0.5, 0.3), (two, -0.8, None)])
    merged = _applied(family, [(result.path, 1.0, None)])
    for key, delta in both.items():
        torch.testing.assert_close(merged[key], delta, rtol=1e-5, atol=1e-6, msg=key)
    with safe_open(result.path, "pt") as f:  # ranks add where both files have the module
        name = kohya_names(family)[targets[0]]
        assert f.get_tensor(f"{name}.lora_down.weight").shape[0] == 3 + 2
        assert float(f.get_tensor(f"{name}.alpha")) == 5.0


def test_svd_rerank_reports_the_truncation_error(tmp_path, two_loras):
    first, second = two_loras
    specs = [LoraSpec(first, 1.0), LoraSpec(second, 0.7)]
    result = merge_loras(tmp_path / "out.safetensors", specs, TINY, rank=2)
    exact = _applied(TINY, [(first, 1.0, None), (second, 0.7, None)])
    approx = _applied(TINY, [(result.path, 1.0, None)])
    # independent: Eckart-Young, the best rank-2 error of each module is its singular values beyond the 2nd
    residual = total = measured = 0.0
    for key, delta in exact.items():
        if not delta.any():
            continue
        singular = torch.linalg.svdvals(delta.flatten(1))
        residual += float((singular[2:] ** 2).sum())
        total += float((singular**2).sum())
        measured += float(((approx[key] - delta) ** 2).sum())
    assert result.relative_error == pytest.approx(math.sqrt(residual / total), rel=1e-4)
    assert math.sqrt(measured / total) == pytest.approx(result.relative_error, rel=1e-4)
    assert 0.05 < result.relative_error < 1  # rank 2 of rank-5 sums: a real truncation
    with safe_open(result.path, "pt") as f:
        downs = [k for k in f.keys() if k.endswith("lora_down.weight")]  # noqa: SIM118 (no __iter__)
        assert {f.get_tensor(k).shape[0] for k in downs} == {2}


def test_loha_concatenation_is_refused_and_rerank_works(tmp_path, two_loras):
    name = kohya_targets(TINY)[0]
    shape = module_shapes(TINY)[name]
    out, cols = shape[0], math.prod(shape[1:])
    generator = torch.Generator().manual_seed(7)
    key = kohya_names(TINY)[name]
    sizes = {"hada_w1_a": (out, 2), "hada_w1_b": (2, cols), "hada_w2_a": (out, 2), "hada_w2_b": (2, cols)}
    loha = {f"{key}.{n}": torch.randn(size, generator=generator) for n, size in sizes.items()}
    loha[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(loha, tmp_path / "loha.safetensors")
    specs = [LoraSpec(two_loras[0], 1.0), LoraSpec(tmp_path / "loha.safetensors", 1.0)]
    with pytest.raises(ParameterError, match="loha module"):
        merge_loras(tmp_path / "out.safetensors", specs, TINY)
    full_rank = min(out, cols)
    result = merge_loras(tmp_path / "out.safetensors", specs, TINY, rank=full_rank)
    assert result.relative_error < 1e-5  # rank >= the matrix rank: nothing is lost
    exact = _applied(TINY, [(s.path, 1.0, None) for s in specs])
    approx = _applied(TINY, [(result.path, 1.0, None)])
    for k, delta in exact.items():
        torch.testing.assert_close(approx[k], delta, rtol=1e-4, atol=1e-5, msg=k)


def _original_and_tuned(root, family):  # noqa: ANN001, ANN202
    """An original random model and a "fine-tuned" one: every weight moved by a random full-rank step."""
    torch.manual_seed(0)
    model = StableDiffusion.from_family(family)
    parts = [m.state_dict() for m in (model.unet, model.vae, model.text_encoder)]
    save_single_file(root / "original.safetensors", *parts, family)
    generator = torch.Generator().manual_seed(1)
    moved = [{k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in p.items()} for p in parts]
    save_single_file(root / "tuned.safetensors", moved[0], parts[1], moved[2], family)
    save_single_file(root / "unet_only.safetensors", moved[0], parts[1], parts[2], family)
    return root


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):  # noqa: ANN201
    return _original_and_tuned(tmp_path_factory.mktemp("tuned"), TINY)


@pytest.mark.parametrize(("clamp", "family"), [(None, TINY), (0.99, TINY), (0.99, TINY_SD2)])
def test_extraction_reapplied_reproduces_the_difference_within_the_reported_error(
    tmp_path, tuned, clamp, family
):
    if family is not TINY:  # SD 2.x layout: q, k, v fused in the checkpoint, separate LoRA modules
        tuned = _original_and_tuned(tmp_path, family)
    result = extract_lora(
        tmp_path / "x.safetensors", tuned / "original.safetensors", tuned / "tuned.safetensors",
        rank=3, conv_rank=2, clamp_quantile=clamp,
    )  # fmt: skip
    original, target = load(tuned / "original.safetensors"), load(tuned / "tuned.safetensors")
    goal = _weights(target)
    start = _weights(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_loras(original, [(result.path, 1.0, None)], bake=True)
    got = _weights(original)
    names = kohya_targets(family, conv=True)
    assert result.modules == len(names)
    residual = sum(float(((got[n + ".weight"] - goal[n + ".weight"]) ** 2).sum()) for n in names)
    total = sum(float(((goal[n + ".weight"] - start[n + ".weight"]) ** 2).sum()) for n in names)
    assert math.sqrt(residual / total) <= result.relative_error * (1 + 1e-5)
    assert math.sqrt(residual / total) == pytest.approx(result.relative_error, rel=1e-3)
    assert 0 < result.relative_error < 1
    metadata = safe_open(result.path, "pt").metadata()
    assert metadata["ss_network_dim"] == "3" and '"conv_dim": "2"' in metadata["ss_network_args"]


def test_extraction_of_a_low_rank_difference_is_exact(tmp_path, tuned):
    lora = save_kohya_lora(
        tmp_path / "l.safetensors", random_lora_factors(TINY, kohya_targets(TINY), rank=2), TINY
    )
    from latentforge.checkpoints.merge import merge_checkpoints

    merged = merge_checkpoints(
        tmp_path / "m.safetensors", tuned / "original.safetensors", mode="none", loras=[LoraSpec(lora)]
    )
    result = extract_lora(
        tmp_path / "x.safetensors", tuned / "original.safetensors", merged.path, rank=2, clamp_quantile=None
    )
    assert result.relative_error < 1e-5


def test_extraction_skips_an_unchanged_text_encoder_and_refuses_other_families(tmp_path, tuned):
    result = extract_lora(
        tmp_path / "x.safetensors", tuned / "original.safetensors", tuned / "unet_only.safetensors"
    )
    assert not any(k.startswith("lora_te_") for k in load_file(result.path))
    assert "U-Net only" in result.notes[0]
    torch.manual_seed(0)
    other = StableDiffusion.from_family(TINY_SD2)
    parts = [m.state_dict() for m in (other.unet, other.vae, other.text_encoder)]
    save_single_file(tmp_path / "sd2.safetensors", *parts, TINY_SD2)
    with pytest.raises(MergeMismatchError):
        extract_lora(tmp_path / "y.safetensors", tuned / "original.safetensors", tmp_path / "sd2.safetensors")
    assert not (tmp_path / "y.safetensors").exists()


def test_cli_merge_loras_extract_and_info(tmp_path, two_loras, tuned, capsys):
    from latentforge.cli import main

    first, second = two_loras
    out = tmp_path / "merged.safetensors"
    assert main(["merge-loras", f"{first}:0.5", f"{second}:0.25:1", "-o", str(out), "--family", "tiny"]) == 0
    error = capsys.readouterr().out.split("relative error: ")[1].split()[0]
    assert float(error) < 1e-6  # concatenation is exact up to float32 rounding
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert '"LoRA concat"' in printed and "LoRA file:" in printed and "ranks [3, 5]" in printed
    extracted = tmp_path / "x.safetensors"
    argv = ["extract-lora", str(tuned / "original.safetensors"), str(tuned / "tuned.safetensors"), "-o"]
    assert main([*argv, str(extracted), "--rank", "2", "--clamp-quantile", "1"]) == 0
    assert "relative error:" in capsys.readouterr().out
    assert main(["merge-loras", str(first), "-o", str(out)]) == 2  # exists, and the family is unknowable
    assert capsys.readouterr().err.startswith("error: ")
