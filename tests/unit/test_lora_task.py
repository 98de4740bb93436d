"""`train lora`: loss falls, only adapters train, the kohya file reads back through read_lora with our keys,
shapes and alpha (weight 0 = no change, weight 1 = the trained network), ss_* metadata, exact resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import latentforge
from latentforge.checkpoints.lora import apply_loras, read_lora
from latentforge.checkpoints.lora_writing import kohya_targets
from latentforge.errors import ConfigError
from latentforge.models.lora_layers import unet_targets
from latentforge.training import checkpointing
from latentforge.training.config import RunConfig, save_config
from latentforge.training.logging import read_log
from latentforge.training.loop import train
from latentforge.training.tasks.lora import LoRATask, make_lora_task

ROOT = Path(__file__).parents[1]
DATA = {"resolution": 16, "synthetic_items": 8, "max_holdout_items": 4, "eval_timesteps": [300, 600]}
NETWORK = {
    "rank": 4,
    "alpha": 2.0,
    "targets": ["attention", "feed_forward", "conv"],
    "train_text_encoder": True,
}


def _config(run_dir: Path, checkpoint: Path, steps: int = 20, **options) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir),
        task="lora",
        max_steps=steps,
        batch_size=4,
        lr=1e-2,
        lr_schedule="constant",
        device="cpu",
        checkpoint_every=0,
        log_every=1,
        task_options={**DATA, "init": str(checkpoint), **NETWORK, "text_encoder_lr": 5e-3, **options},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint):
    """A LoRA trained for 20 steps on the tiny model: (task, config, export path, losses before/after)."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    config = _config(run_dir, tiny_checkpoint)
    task = make_lora_task(config)
    unet_before = {k: v.clone() for k, v in task.unet.state_dict().items()}
    before = task.evaluate(task.trainable())["loss"]
    artefact = train(task, config)
    after = task.evaluate(task.trainable())["loss"]
    assert all(torch.equal(v, task.unet.state_dict()[k]) for k, v in unet_before.items())  # frozen
    return task, config, artefact, before, after


def test_loss_falls_and_only_adapters_train(trained):
    task, _, _, before, after = trained
    assert after < 0.9 * before
    assert not any(p.requires_grad for p in task.unet.parameters())
    assert not any(p.requires_grad for p in task.text_encoder.parameters())


def test_targets_are_kohyas(tiny_checkpoint):
    task = LoRATask(
        {**DATA, "init": str(tiny_checkpoint), "targets": ["attention", "feed_forward"]}, progress=False
    )
    ours = {f"model.diffusion_model.{n}" for n in unet_targets(task.unet, ["attention", "feed_forward"])}
    assert ours == {n for n in kohya_targets(task.family) if n.startswith("model.diffusion_model.")}
    with_conv = {
        f"model.diffusion_model.{n}" for n in unet_targets(task.unet, ["attention", "feed_forward", "conv"])
    }
    assert with_conv == {
        n for n in kohya_targets(task.family, conv=True) if n.startswith("model.diffusion_model.")
    }


def test_export_reads_back_with_our_keys_shapes_and_alpha(trained):
    task, config, artefact, _, _ = trained
    lora = read_lora(artefact, task.family, task.text_encoder)
    assert not lora.unmatched
    network = task.network
    assert {m.target for m in lora.modules} == {module for _, module in network.module_names.values()}
    by_target = {m.target: m for m in lora.modules}
    for name, adapter in network.adapters.items():
        factors = by_target[network.module_names[name][1]].factors
        down, up = factors["lora_down.weight"], factors["lora_up.weight"]
        assert torch.equal(down.reshape(adapter.lora_down.weight.shape), adapter.lora_down.weight)
        assert torch.equal(up.reshape(adapter.lora_up.weight.shape), adapter.lora_up.weight)
        assert float(factors["alpha"]) == 2.0 and down.shape[0] == 4
    assert any(m.component == "text_encoder" for m in lora.modules)
    assert any(
        len(m.factors["lora_down.weight"].shape) == 4 and m.factors["lora_down.weight"].shape[2] == 3
        for m in lora.modules
    )  # LoCon 3x3
    with safe_open(artefact, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_num_train_images"] == "8" and meta["ss_steps"] == "20"
    assert meta["ss_learning_rate"] == "0.01" and meta["ss_text_encoder_lr"] == "0.005"
    assert meta["ss_resolution"] == "(16, 16)" and "sshs_model_hash" in meta


def test_applied_at_weight_0_changes_nothing_and_at_1_equals_the_trained_network(trained, tiny_checkpoint):
    task, _, artefact, _, _ = trained
    model = latentforge.load(tiny_checkpoint)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800])
    ids = model.tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        base_text = model.text_encoder(ids)[0]
        base = model.unet(x, t, base_text)
        with apply_loras(model, [(artefact, 0.0, None)]):
            assert torch.equal(model.unet(x, t, model.text_encoder(ids)[0]), base)
        with apply_loras(model, [(artefact, 1.0, None)]):
            patched_text = model.text_encoder(ids)[0]
            patched = model.unet(x, t, patched_text)
        task.network.eval()
        hooked_text = task.text_encoder(ids)[0]
        hooked = task.unet(x, t, hooked_text)
    assert (patched - base).abs().max() > 1e-4
    torch.testing.assert_close(patched_text, hooked_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched, hooked, rtol=1e-4, atol=1e-5)


def test_lora_needs_a_model_and_valid_targets(tiny_checkpoint):
    with pytest.raises(ConfigError, match="task_options.init is required"):
        LoRATask(DATA, progress=False)
    with pytest.raises(ConfigError, match="unknown target 'mlp'"):
        LoRATask({**DATA, "init": str(tiny_checkpoint), "targets": ["mlp"]}, progress=False)


STEPS, EVERY = 6, 3


def test_sigkill_then_resume_is_bit_exact(tmp_path, tiny_checkpoint):
    """With EMA, rank/module dropout and caption shuffling, all of whose randomness a resume must restore."""
    options = {"rank_dropout": 0.25, "module_dropout": 0.1, "dropout": 0.1, "shuffle_caption": True}
    options["targets"] = ["attention"]

    def config(run_dir: Path) -> RunConfig:
        c = _config(run_dir, tiny_checkpoint, STEPS, **options)
        c.checkpoint_every, c.ema_decay, c.keep_checkpoints, c.deterministic = EVERY, 0.8, 0, True
        return c

    reference = config(tmp_path / "reference")
    path = tmp_path / "config.toml"
    save_config(config(tmp_path / "run"), path)
    save_config(reference, tmp_path / "reference.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT.parent / 'src'}:{ROOT}"}
    script = [sys.executable, str(ROOT / "training_kill.py"), "lora"]
    full = subprocess.run(
        [*script, str(tmp_path / "reference.toml")], env=env, capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr
    killed = subprocess.run(
        [*script, str(path)], env={**env, "KILL_AT_STEP": "5"}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path / "run")] == [3]
    resumed = subprocess.run([*script, str(path)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a, b = (
        load_file(tmp_path / "reference" / "final.safetensors"),
        load_file(tmp_path / "run" / "final.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in (f"step_{STEPS}.pt",):
        sa = checkpointing.load_checkpoint(tmp_path / "reference" / "checkpoints" / name)
        sb = checkpointing.load_checkpoint(tmp_path / "run" / "checkpoints" / name)
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
        assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    losses = [
        [(r["step"], r["loss"]) for r in read_log(d / "log.csv")]
        for d in (tmp_path / "reference", tmp_path / "run")
    ]
    assert losses[0] == losses[1]
