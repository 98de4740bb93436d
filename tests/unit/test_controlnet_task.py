"""The ControlNet training task at tiny scale: step 0 changes nothing, the loss falls, only the ControlNet
trains, resume is exact, and the export loads and drives generation."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from latentforge.checkpoints.controlnet import load_controlnet
from latentforge.training.config import RunConfig
from latentforge.training.loop import train
from latentforge.training.tasks.controlnet import ControlNetTask, hints, make_controlnet_task

OPTIONS = {"resolution": 32, "synthetic_items": 8, "max_holdout_items": 4, "eval_timesteps": [300, 700],
           "eval_batch_size": 4, "sample_items": 1, "sample_seeds": [0], "sample_steps": 2}  # fmt: skip


@pytest.fixture
def task(tiny_checkpoint):
    return ControlNetTask({**OPTIONS, "base": str(tiny_checkpoint)}, seed=0, progress=False)


def _batch(task, n=8):
    dataset = task.dataset("train")
    return torch.utils.data.default_collate([dataset[i] for i in range(n)])


def test_step_zero_changes_nothing(task):
    """Zero convolutions: an untrained ControlNet's residuals are exactly 0, the U-Net's output the base's."""
    batch = _batch(task, 4)
    z0, context = task.base.latents_and_context(batch, None)
    hint = task._hints(batch["pixels"], 0)
    assert hint.shape == (4, 3, 32, 32) and hint.min() >= 0 and hint.max() == 1  # canny edges of the shapes
    t = torch.tensor([10, 300, 600, 990])
    with torch.no_grad():
        residuals = task.controlnet(z0, t, context, hint)
        assert all(r.abs().max() == 0 for r in residuals)
        assert torch.equal(task.unet(z0, t, context, control=residuals), task.unet(z0, t, context))
    # and its encoder is a copy of the base U-Net's
    base = task.unet.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in task.controlnet.state_dict().items() if k in base)


def test_loss_falls_and_only_the_controlnet_trains(task):
    model = task.trainable()
    unet_before = {k: v.clone() for k, v in task.unet.state_dict().items()}
    before = task.evaluate(model)
    assert before["loss"] == pytest.approx(before["loss_base"], rel=1e-6)  # step 0: no effect
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch, generator = _batch(task), torch.Generator().manual_seed(0)
    for _ in range(25):
        loss, _ = task.loss(model, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(model)
    assert after["loss"] < 0.9 * after["loss_base"], (before, after)
    assert after["loss_base"] == before["loss_base"]
    assert all(torch.equal(v, unet_before[k]) for k, v in task.unet.state_dict().items())
    assert task.samples(model).size == (64, 32)  # one row per holdout item: its hint, the controlled image


def test_caption_dropout_is_half_by_default_and_hints_follow_the_module():
    from latentforge.training.tasks.controlnet import ControlNetTaskOptions

    assert ControlNetTaskOptions().caption_dropout == 0.5
    pixels = torch.full((1, 3, 16, 16), -1.0)
    pixels[:, :, 4:12, 4:12] = 1.0
    edges = hints(pixels, "canny", -1, -1, 0)
    inverted = hints(pixels, "invert", -1, -1, 0)
    assert edges[0, 0, 8, 8] == 0 and edges[0, 0].sum() > 0
    assert torch.equal(inverted, 1 - (pixels + 1) / 2)


def _config(run_dir, base, **overrides):
    return RunConfig(run_dir=str(run_dir), task="controlnet", max_steps=4, batch_size=4, lr=1e-3,
                     device="cpu",
                     checkpoint_every=2, keep_checkpoints=5, eval_every=0, sample_every=0, deterministic=True,
                     task_options={**OPTIONS, "base": str(base)}, **overrides)  # fmt: skip


def test_resume_is_exact_and_the_export_generates(tmp_path, tiny_checkpoint):
    reference = _config(tmp_path / "a", tiny_checkpoint)
    artefact = train(make_controlnet_task(reference), reference)
    # A run stopped after step 2: the same checkpoint at 2 without what came after, then resumed.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "step_4.pt").unlink()
    (tmp_path / "b" / "final.safetensors").unlink()
    resumed = _config(tmp_path / "b", tiny_checkpoint)
    train(make_controlnet_task(resumed), resumed)
    a, b = load_file(artefact), load_file(tmp_path / "b" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.startswith("control_model.zero_convs."))  # it trained

    from PIL import Image

    import latentforge
    from latentforge.pipelines.controlnet import ControlNetUnit

    model = latentforge.load(tiny_checkpoint)
    unit = ControlNetUnit(image=Image.new("RGB", (32, 32), "white"), network=load_controlnet(artefact))
    images = latentforge.txt2img(
        model, "a red circle", steps=2, width=32, height=32, seed=1, controlnet=(unit,)
    )
    assert images[0].size == (32, 32) and "ControlNet 0" in images[0].info["parameters"]
