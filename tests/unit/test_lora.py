"""LoRA/LyCORIS reading and the weight-patch mechanism: exact undo, strengths, refusals, reports, math.

LoHa/LoKr reconstructions are checked against peft's `get_delta_weight` (which follows LyCORIS) on the
same factors; LoRA/LoCon/PEFT against diffusers in tests/parity/test_lora_parity.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentforge.checkpoints.errors import CorruptCheckpointError, KeyMismatchError, UnknownArchitectureError
from latentforge.checkpoints.lora import apply_loras, lora_short_hash
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.models.patches import WeightDelta, patch_weights

TO_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear [32, 32]
ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear [32, context 32]
CONV = "input_blocks.1.0.in_layers.2"  # Conv2d [32, 32, 3, 3]
PROJ_IN = "input_blocks.1.1.proj_in"  # 1x1 Conv2d [32, 32, 1, 1] in SD1's layout
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def kohya(name: str) -> str:
    return name.replace(".", "_")


def lora_factors(shape: torch.Size, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=g)
    up = torch.randn((shape[0], rank, *(1,) * (len(shape) - 2)), generator=g)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(rank / 2)}


def mixed_file(model: StableDiffusion, path: Path) -> Path:
    """LoRA (LDM spelling), LoCon conv, LoHa, LoKr, full diff and a text-encoder LoRA in one file."""
    unet = dict(model.unet.named_parameters())
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for name, factors in (
        (f"lora_unet_{kohya(TO_Q)}", lora_factors(unet[f"{TO_Q}.weight"].shape, 4, 1)),
        (f"lora_unet_{kohya(CONV)}", lora_factors(unet[f"{CONV}.weight"].shape, 4, 2)),
        (f"lora_te_{kohya(TE_Q)}", lora_factors(torch.Size([32, 32]), 4, 3)),
    ):
        tensors |= {f"{name}.{k}": v for k, v in factors.items()}
    loha = f"lora_unet_{kohya(ATTN2_K)}"
    for part in ("w1", "w2"):
        tensors[f"{loha}.hada_{part}_a"] = torch.randn(32, 2, generator=g)
        tensors[f"{loha}.hada_{part}_b"] = torch.randn(2, 32, generator=g)
    tensors[f"{loha}.alpha"] = torch.tensor(1.0)
    lokr = f"lora_unet_{kohya(PROJ_IN)}"
    tensors[f"{lokr}.lokr_w1"] = torch.randn(4, 4, generator=g)
    tensors[f"{lokr}.lokr_w2_a"] = torch.randn(8, 2, generator=g)
    tensors[f"{lokr}.lokr_w2_b"] = torch.randn(2, 8, generator=g)
    tensors[f"{lokr}.alpha"] = torch.tensor(1.0)
    full = "lora_unet_input_blocks_1_1_proj_out"
    tensors[f"{full}.diff"] = torch.randn(unet["input_blocks.1.1.proj_out.weight"].shape, generator=g) * 0.1
    tensors[f"{full}.diff_b"] = torch.randn(32, generator=g) * 0.1
    tensors[f"lora_unet_{kohya(CONV)}.diff_b"] = torch.randn(32, generator=g) * 0.1  # LoCon with a bias
    save_file(tensors, path)
    return path


@pytest.fixture
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY)


def snapshot(model: StableDiffusion) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v.clone()
        for part in ("unet", "text_encoder", "vae")
        for k, v in getattr(model, part).state_dict().items()
    }


def assert_identical(model: StableDiffusion, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    different = [k for k in before if not torch.equal(after[k], before[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_undo_restores_every_weight_bit_for_bit(model, tmp_path, dtype):
    model = model.to(dtype=dtype)
    before = snapshot(model)
    path = mixed_file(model, tmp_path / "mixed.safetensors")
    handle = apply_loras(model, [(path, 0.8, 0.3)])
    changed = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    expected = {f"unet.{m}.weight" for m in (TO_Q, CONV, ATTN2_K, PROJ_IN, "input_blocks.1.1.proj_out")}
    biases = {"unet.input_blocks.1.1.proj_out.bias", f"unet.{CONV}.bias"}
    assert changed == expected | biases | {f"text_encoder.{TE_Q}.weight"}
    assert handle.reports[0].applied == {"lora": 3, "loha": 1, "lokr": 1, "full": 1}
    handle.undo()
    assert_identical(model, before)
    with apply_loras(model, [(path, -1.5, None)]):
        assert not torch.equal(
            dict(model.unet.named_parameters())[f"{TO_Q}.weight"], before[f"unet.{TO_Q}.weight"]
        )
    assert_identical(model, before)


def test_strengths_and_bake(model, tmp_path):
    params = dict(model.unet.named_parameters())
    base = params[f"{TO_Q}.weight"].detach().clone()
    te_base = dict(model.text_encoder.named_parameters())[f"{TE_Q}.weight"].detach().clone()
    a = mixed_file(model, tmp_path / "a.safetensors")
    factors = lora_factors(base.shape, 4, 1)
    delta = factors["lora_up.weight"] @ factors["lora_down.weight"] * 0.5  # alpha / rank = 2 / 4
    with apply_loras(model, [(a, 0.7, 0.0)]):
        torch.testing.assert_close(params[f"{TO_Q}.weight"].detach(), base + 0.7 * delta, rtol=0, atol=1e-5)
        assert torch.equal(dict(model.text_encoder.named_parameters())[f"{TE_Q}.weight"], te_base)
    before = snapshot(model)
    with apply_loras(model, [(a, 0.0, 0.0)]):  # weight 0 is no LoRA at all, bit for bit
        assert_identical(model, before)
    # two files at 0.5 each: applied together == baked together == the sum of both deltas
    b = tmp_path / "b.safetensors"
    save_file({f"lora_unet_{kohya(TO_Q)}.{k}": v for k, v in lora_factors(base.shape, 2, 9).items()}, b)
    factors_b = lora_factors(base.shape, 2, 9)
    delta_b = factors_b["lora_up.weight"] @ factors_b["lora_down.weight"] * 0.5  # alpha / rank = 1 / 2
    with apply_loras(model, [(a, 0.5, 0.5), (b, 0.5, 0.5)]):
        together = snapshot(model)
    apply_loras(model, [(a, 0.5, 0.5), (b, 0.5, 0.5)], bake=True)
    assert_identical(model, together)
    expected = base + 0.5 * delta + 0.5 * delta_b
    torch.testing.assert_close(params[f"{TO_Q}.weight"].detach(), expected, rtol=0, atol=1e-5)


def test_diffusers_spellings_land_on_the_same_weights(model, tmp_path):
    """kohya (diffusers names), PEFT, `.lora.down` and attention-processor layouts give one result."""
    shape = dict(model.unet.named_parameters())[f"{TO_Q}.weight"].shape
    f = lora_factors(shape, 4, 5)
    down, up = f["lora_down.weight"], f["lora_up.weight"]
    diffusers_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    layouts = {
        "kohya": {
            f"lora_unet_{kohya(diffusers_name)}_to_q.lora_down.weight": down,
            f"lora_unet_{kohya(diffusers_name)}_to_q.lora_up.weight": up,
        },
        "peft": {
            f"unet.{diffusers_name}.to_q.lora_A.weight": down,
            f"unet.{diffusers_name}.to_q.lora_B.weight": up,
        },
        "old": {
            f"unet.{diffusers_name}.to_q.lora.down.weight": down,
            f"unet.{diffusers_name}.to_q.lora.up.weight": up,
        },
        "processor": {
            f"unet.{diffusers_name}.processor.to_q_lora.down.weight": down,
            f"unet.{diffusers_name}.processor.to_q_lora.up.weight": up,
        },
        "bare": {f"{diffusers_name}.to_q.lora_A.weight": down, f"{diffusers_name}.to_q.lora_B.weight": up},
    }
    results = {}
    for name, tensors in layouts.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with apply_loras(model, [(tmp_path / f"{name}.safetensors", 1.0, 1.0)]):
            results[name] = dict(model.unet.named_parameters())[f"{TO_Q}.weight"].detach().clone()
    expected = results.pop("kohya")
    torch.testing.assert_close(expected - dict(model.unet.named_parameters())[f"{TO_Q}.weight"], up @ down)
    for name, weight in results.items():
        assert torch.equal(weight, expected), name


def _peft_layer(kind: str, base: torch.nn.Module, **options):  # noqa: ANN202
    peft = pytest.importorskip("peft")
    config_cls = peft.LoHaConfig if kind == "loha" else peft.LoKrConfig
    torch.manual_seed(11)
    wrapped = peft.get_peft_model(
        torch.nn.Sequential(base), config_cls(target_modules=["0"], init_weights=False, **options)
    )
    return wrapped.base_model.model[0]


@pytest.mark.parametrize(
    ("kind", "target", "options"),
    [
        ("loha", TO_Q, {"r": 4, "alpha": 2}),
        ("loha", CONV, {"r": 4, "alpha": 3}),
        ("loha", CONV, {"r": 4, "alpha": 3, "use_effective_conv2d": True}),
        ("lokr", TO_Q, {"r": 2, "alpha": 3}),
        ("lokr", TO_Q, {"r": 1, "alpha": 3, "decompose_both": True}),
        ("lokr", CONV, {"r": 2, "alpha": 3}),
        ("lokr", CONV, {"r": 2, "alpha": 3, "use_effective_conv2d": True}),
    ],
)
def test_lycoris_update_equals_peft(model, tmp_path, kind, target, options):
    weight = dict(model.unet.named_parameters())[f"{target}.weight"]
    if weight.ndim == 4:
        base = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=1, bias=False)
    else:
        base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer = _peft_layer(kind, base, **options)
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    if kind == "lokr":
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    tensors = {}
    for name in names:
        params = getattr(layer, name)
        if "default" in params:
            params["default"].data.normal_()  # peft's init leaves updates near 1e-5: too small to test
            tensors[f"lora_unet_{kohya(target)}.{name}"] = params["default"].detach().clone()
    tensors[f"lora_unet_{kohya(target)}.alpha"] = torch.tensor(float(options["alpha"]))
    if kind == "lokr" and not any(k.endswith(("_a", "_b")) for k in tensors):
        pytest.fail("the case should factor at least one LoKr matrix")
    save_file(tensors, tmp_path / "ly.safetensors")
    reference = layer.get_delta_weight("default").detach()
    before = weight.detach().clone()
    with apply_loras(model, [(tmp_path / "ly.safetensors", 1.0, 1.0)]):
        torch.testing.assert_close(weight.detach() - before, reference, rtol=1e-4, atol=1e-5)
    assert reference.abs().max() > 1e-3  # the comparison saw a real update


def test_full_diff_and_tucker_lora_match_their_formulas(model, tmp_path):
    conv = dict(model.unet.named_parameters())[f"{CONV}.weight"]
    g = torch.Generator().manual_seed(3)
    mid, down, up = (
        torch.randn(4, 4, 3, 3, generator=g),
        torch.randn(4, 32, 1, 1, generator=g),
        torch.randn(32, 4, 1, 1, generator=g),
    )
    save_file(
        {
            f"lora_unet_{kohya(CONV)}.lora_mid.weight": mid,
            f"lora_unet_{kohya(CONV)}.lora_down.weight": down,
            f"lora_unet_{kohya(CONV)}.lora_up.weight": up,
            f"lora_unet_{kohya(CONV)}.alpha": torch.tensor(2.0),
        },
        tmp_path / "tucker.safetensors",
    )
    # down (1x1) -> mid (3x3) -> up (1x1) is one 3x3 conv with weight up . mid . down
    expected = torch.zeros_like(conv)
    for o in range(32):
        for i in range(32):
            expected[o, i] = sum(
                up[o, a, 0, 0] * mid[a, b] * down[b, i, 0, 0] for a in range(4) for b in range(4)
            )
    before = conv.detach().clone()
    with apply_loras(model, [(tmp_path / "tucker.safetensors", 1.0, 1.0)]):
        torch.testing.assert_close(conv.detach() - before, expected * 0.5, rtol=1e-4, atol=1e-4)


def test_refusals_leave_the_model_unchanged(model, tmp_path):
    before = snapshot(model)
    shape = dict(model.unet.named_parameters())[f"{TO_Q}.weight"].shape
    good = {f"lora_unet_{kohya(TO_Q)}.{k}": v for k, v in lora_factors(shape, 4, 1).items()}

    def refused(name: str, tensors: dict, error: type, *words: str) -> None:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(error) as caught:
            apply_loras(model, [(mixed_file(model, tmp_path / "ok.safetensors"), 1.0, 1.0), (path, 1.0, 1.0)])
        message = str(caught.value)
        assert str(path) in message
        assert all(word in message for word in words), message
        assert_identical(model, before)

    nan = dict(good)
    nan[f"lora_unet_{kohya(TO_Q)}.lora_up.weight"] = torch.full_like(
        nan[f"lora_unet_{kohya(TO_Q)}.lora_up.weight"], float("nan")
    )
    refused("nan", nan, CorruptCheckpointError, "lora_up.weight", "NaN")
    wrong = {k: v for k, v in good.items()}
    wrong[f"lora_unet_{kohya(TO_Q)}.lora_down.weight"] = torch.randn(4, 48)
    refused("shape", wrong, KeyMismatchError, TO_Q, "[32, 48]")
    # an SDXL LoRA on SD1: names of two text encoders and a 2048-wide cross-attention
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4),
        f"lora_unet_{kohya(ATTN2_K)}.lora_down.weight": torch.randn(4, 2048),
        f"lora_unet_{kohya(ATTN2_K)}.lora_up.weight": torch.randn(32, 4),
    }
    refused("sdxl", sdxl, KeyMismatchError, "SDXL", "tiny")
    nothing = {k.replace("lora_unet_", "lora_unet_foo_"): v for k, v in good.items()}
    refused("nothing", nothing, UnknownArchitectureError, "none of its 1 modules", "foo")
    refused(
        "dora",
        good | {f"lora_unet_{kohya(TO_Q)}.dora_scale": torch.ones(32, 1)},
        UnknownArchitectureError,
        "DoRA",
    )
    half = {k: v for k, v in good.items() if "lora_up" not in k}
    refused("half", half, CorruptCheckpointError, "lacks lora_up.weight")
    refused(
        "alpha", {f"lora_unet_{kohya(TO_Q)}.alpha": torch.tensor(1.0)}, CorruptCheckpointError, "only alpha"
    )
    both = good | {f"lora_unet_{kohya(TO_Q)}.diff": torch.zeros(32, 32)}
    refused("both", both, CorruptCheckpointError, "both `diff` and lora")
    refused(
        "alien",
        good | {"model.diffusion_model.x": torch.ones(1)},
        UnknownArchitectureError,
        "model.diffusion_model.x",
    )


def test_unmatched_modules_are_warned_and_reported(model, tmp_path):
    shape = dict(model.unet.named_parameters())[f"{TO_Q}.weight"].shape
    tensors = {f"lora_unet_{kohya(TO_Q)}.{k}": v for k, v in lora_factors(shape, 4, 1).items()}
    tensors |= {f"lora_unet_output_blocks_9_1_proj_in.{k}": v for k, v in lora_factors(shape, 4, 2).items()}
    save_file(tensors, tmp_path / "some.safetensors")
    with pytest.warns(UserWarning, match="1 LoRA modules match nothing.*output_blocks_9_1_proj_in"):
        handle = apply_loras(model, [(tmp_path / "some.safetensors", 1.0, 1.0)])
    assert handle.reports[0].unmatched == ["output_blocks_9_1_proj_in"]
    assert "1 modules match nothing" in handle.reports[0].summary()
    handle.undo()


def test_short_hash_is_a1111s(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_a.alpha": torch.tensor(1.0)}, path)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    assert lora_short_hash(path) == hashlib.sha256(data[8 + size :]).hexdigest()[:12]
    save_file(
        {"lora_unet_a.alpha": torch.tensor(1.0)}, path, metadata={"sshs_model_hash": "abcdef0123456789"}
    )
    assert json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert lora_short_hash(path) == "abcdef012345"


def test_patch_weights_checks_everything_before_writing(model):
    params = dict(model.unet.named_parameters())
    before = params[f"{TO_Q}.weight"].detach().clone()
    deltas = [
        WeightDelta("unet", f"{TO_Q}.weight", tuple(before.shape), lambda: torch.ones(32, 32)),
        WeightDelta("unet", f"{TO_Q}.weight", (3, 3), lambda: torch.ones(3, 3)),
    ]
    with pytest.raises(ValueError, match=r"delta \[3, 3\] vs parameter \[32, 32\]"):
        patch_weights({"unet": model.unet}, deltas)
    assert torch.equal(params[f"{TO_Q}.weight"], before)


def test_stacked_patches_undo_newest_first(model, tmp_path):
    before = snapshot(model)
    path = mixed_file(model, tmp_path / "mixed.safetensors")
    first = apply_loras(model, [(path, 1.0, 1.0)])
    second = apply_loras(model, [(path, 0.5, 0.5)])
    with pytest.raises(RuntimeError, match="undo it first"):
        first.undo()
    second.undo()
    first.undo()
    assert_identical(model, before)
