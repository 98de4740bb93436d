"""`train lora` / `train dreambooth` on tiny SDXL (issue 21 item 4): kohya's SDXL names (sgm U-Net names,
`lora_te1_` CLIP-L, `lora_te2_` bigG, `ss_base_model_version = sdxl_base_v1-0`, checked against
sd-scripts' `networks/lora.py` and `sdxl_model_util.py`), loss falls, the export reads back with the
trained factors, weight 0 changes nothing and weight 1 equals the trained network, resume is bit-exact."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import latentforge
from latentforge.checkpoints.lora import apply_loras, read_lora
from latentforge.checkpoints.lora_writing import kohya_names, kohya_targets, module_shapes
from latentforge.errors import ConfigError, ParameterError
from latentforge.models.families import SDXL, SDXL_REFINER, TINY_XL, TINY_XL_REFINER
from latentforge.models.unet import vector_conditioning
from latentforge.pipelines.sdxl_conditioning import SDXL_PENULTIMATE
from latentforge.training.config import RunConfig
from latentforge.training.loop import train
from latentforge.training.tasks.dreambooth import make_dreambooth
from latentforge.training.tasks.lora import LoRATask, make_lora_task
from references import save_random_model

DATA = {
    "resolution": 32,
    "synthetic_items": 8,
    "max_holdout_items": 2,
    "eval_timesteps": [300, 600],
    "sample_prompts": [],
}
NETWORK = {
    "rank": 4,
    "alpha": 2.0,
    "targets": ["attention", "feed_forward", "conv"],
    "train_text_encoder": True,
}


def _save(family, path):  # noqa: ANN001, ANN202
    save_random_model(family, path)
    return path


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory):
    return _save(TINY_XL, tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors")


def _config(run_dir, checkpoint, steps: int, **options) -> RunConfig:  # noqa: ANN001
    return RunConfig(
        run_dir=str(run_dir),
        task="lora",
        max_steps=steps,
        batch_size=4,
        lr=2e-2,
        lr_schedule="constant",
        device="cpu",
        checkpoint_every=2,
        log_every=1,
        task_options={**DATA, "init": str(checkpoint), "text_encoder_lr": 5e-3, **NETWORK, **options},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, xl_checkpoint):
    """A LoRA (U-Net attention + LoCon, both encoders) trained 6 steps on tiny SDXL, with a dropout whose
    randomness a resume must restore."""
    root = tmp_path_factory.mktemp("xl-lora")
    config = _config(root / "full", xl_checkpoint, 6, rank_dropout=0.25)
    task = make_lora_task(config)
    before = task.evaluate(task.trainable())["loss"]
    artefact = train(task, config)
    after = task.evaluate(task.trainable())["loss"]
    return task, root, artefact, before, after


def test_kohya_sdxl_names_and_module_counts():
    names = kohya_names(SDXL)
    unet = "model.diffusion_model."
    # sd-scripts' SdxlUNet2DConditionModel keeps sgm's names; create_modules: prefix + name, "." -> "_"
    assert names[unet + "input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert names[unet + "output_blocks.2.2.conv"] == "lora_unet_output_blocks_2_2_conv"
    assert names[unet + "input_blocks.3.0.op"] == "lora_unet_input_blocks_3_0_op"
    te1, te2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.transformer."
    layer = "text_model.encoder.layers.0.self_attn.q_proj"
    assert names[te1 + layer] == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert names[te2 + layer.replace("layers.0", "layers.31")] == (
        "lora_te2_text_model_encoder_layers_31_self_attn_q_proj"
    )
    assert len(set(names.values())) == len(names)
    targets = kohya_targets(SDXL)
    # 11 Transformer2DModels holding 70 blocks: 70 x (4 + 4 + 2) + 11 x (proj_in, proj_out) = 722 U-Net
    # modules; CLIP-L 12 x 6 and bigG 32 x 6 encoder Linears (q, k, v, out, fc1, fc2) = 72 + 192
    assert sum(n.startswith(unet) for n in targets) == 722
    assert sum(n.startswith(te1) for n in targets) == 72 and sum(n.startswith(te2) for n in targets) == 192
    shapes = module_shapes(SDXL)
    assert all(len(shapes[n]) == 2 for n in targets)  # SDXL's proj_in/out are Linear
    with pytest.raises(ParameterError, match="refiner"):
        kohya_names(SDXL_REFINER)


def test_loss_falls_and_only_adapters_train(trained):
    task, _, _, before, after = trained
    assert after < 0.9 * before, (before, after)
    for model in (task.unet, task.text_encoder, task.text_encoder_2):
        assert not any(p.requires_grad for p in model.parameters())
    components = {component for component, _ in task.network.module_names.values()}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    # the text adapters really trained (their gradients flow through the SDXL conditioning)
    up = [a.lora_up.weight for n, a in task.network.adapters.items() if n.startswith("lora_te2_")]
    assert any(w.abs().max() > 0 for w in up)


def test_export_has_kohyas_keys_and_reads_back_with_our_factors(trained):
    task, _, artefact, _, _ = trained
    tensors = load_file(artefact)
    modules = {k.split(".")[0] for k in tensors}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # LoCon 3x3
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in modules
    assert not any(m.startswith(("lora_unet_down_blocks", "lora_te_")) for m in modules)
    lora = read_lora(artefact, task.family, task.text_encoder, task.text_encoder_2)
    assert not lora.unmatched
    network = task.network
    landed = {(m.into, m.target) for m in lora.modules}
    assert landed == set(network.module_names.values())
    by_target = {(m.into, m.target): m for m in lora.modules}
    for name, adapter in network.adapters.items():
        factors = by_target[network.module_names[name]].factors
        down, up = factors["lora_down.weight"], factors["lora_up.weight"]
        assert torch.equal(down.reshape(adapter.lora_down.weight.shape), adapter.lora_down.weight)
        assert torch.equal(up.reshape(adapter.lora_up.weight.shape), adapter.lora_up.weight)
        assert float(factors["alpha"]) == 2.0 and down.shape[0] == 4
    with safe_open(artefact, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert (
        meta["ss_network_dim"] == "4"
        and meta["ss_text_encoder_lr"] == "0.005"
        and meta["ss_learning_rate"] == "0.02"
    )


def _forward(model, task, ids, ids_2, x, t):  # noqa: ANN001, ANN202
    """U-Net output for the prompt through both encoders (the training task's conditioning)."""
    skip = task.family.default_clip_skip
    hidden_l = model.text_encoder(ids, skip, final_norm=False)[0]
    hidden_g, pooled = model.text_encoder_2(ids_2, SDXL_PENULTIMATE, final_norm=False)
    numbers = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).expand(len(x), -1)
    vector = vector_conditioning(pooled, numbers, task.family.unet.vector_embed_dim)
    return model.unet(x, t, torch.cat([hidden_l, hidden_g], dim=-1), y=vector)


def test_applied_at_weight_0_changes_nothing_and_at_1_equals_the_trained_network(trained, xl_checkpoint):
    task, _, artefact, _, _ = trained
    model = latentforge.load(xl_checkpoint)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 800])
    prompts = ["a red circle", "a blue square"]
    ids, ids_2 = model.tokenizer(prompts), model.tokenizer_2(prompts)
    with torch.no_grad():
        base = _forward(model, task, ids, ids_2, x, t)
        with apply_loras(model, [(artefact, 0.0, None)]):
            assert torch.equal(_forward(model, task, ids, ids_2, x, t), base)
        with apply_loras(model, [(artefact, 1.0, None)]) as handle:
            assert not handle.reports[0].unmatched
            patched = _forward(model, task, ids, ids_2, x, t)
        task.network.eval()
        hooked = _forward(task, task, ids, ids_2, x, t)
    assert (patched - base).abs().max() > 1e-4
    torch.testing.assert_close(patched, hooked, rtol=1e-4, atol=1e-5)


def test_resume_from_a_checkpoint_is_bit_exact(trained, xl_checkpoint):
    _, root, artefact, _, _ = trained
    shutil.copytree(root / "full" / "checkpoints", root / "split" / "checkpoints")
    (root / "split" / "checkpoints" / "step_6.pt").unlink()
    (root / "split" / "checkpoints" / "step_4.pt").unlink()
    config = _config(root / "split", xl_checkpoint, 6, rank_dropout=0.25)
    resumed = train(make_lora_task(config), config)
    full, split = load_file(artefact), load_file(resumed)
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)


def test_dreambooth_lora_on_sdxl_trains_with_prior_loss(tmp_path, xl_checkpoint):
    options = {
        **DATA,
        "init": str(xl_checkpoint),
        "class_word": "shape",
        "num_class_images": 2,
        "class_steps": 2,
        "class_batch_size": 2,
        "targets": ["attention"],
    }
    config = RunConfig(
        run_dir=str(tmp_path / "db"), task="dreambooth", max_steps=2, batch_size=2, lr=1e-2,
        lr_schedule="constant", device="cpu", checkpoint_every=0, log_every=1, task_options=options,
    )  # fmt: skip
    task = make_dreambooth(options, run=config, progress=False)
    batch = next(iter(torch.utils.data.DataLoader(task.dataset("train"), batch_size=2)))
    loss, metrics = task.loss(task.trainable(), batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and metrics["prior_loss"] > 0
    artefact = train(task, config)
    with safe_open(artefact, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert f.metadata()["ss_num_reg_images"] == "2"


def test_a_refiner_is_refused(tmp_path):
    refiner = _save(TINY_XL_REFINER, tmp_path / "refiner.safetensors")
    with pytest.raises(ConfigError, match="refiner"):
        LoRATask({**DATA, "init": str(refiner)}, progress=False)
