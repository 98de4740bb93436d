"""`train dreambooth`: identifier + class captions, class images generated once by the base model through the
pipeline (reused on resume, only missing ones regenerated), the prior loss term, full and LoRA modes."""

import pytest
import torch
from PIL import Image

from latentforge.errors import ConfigError
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import iter_images
from latentforge.training.config import RunConfig
from latentforge.training.loop import train
from latentforge.training.tasks.dreambooth import DreamBoothFull, DreamBoothLoRA, make_dreambooth_task

DATA = {"resolution": 16, "synthetic_items": 4, "max_holdout_items": 2, "eval_timesteps": [300, 600]}
DB = {"token": "sks", "class_word": "shape", "num_class_images": 3, "class_steps": 2, "class_batch_size": 2}


def _config(tmp_path, checkpoint, steps=4, **options) -> RunConfig:
    return RunConfig(
        run_dir=str(tmp_path / "run"),
        task="dreambooth",
        max_steps=steps,
        batch_size=2,
        lr=1e-2,
        lr_schedule="constant",
        device="cpu",
        checkpoint_every=0,
        log_every=1,
        task_options={**DATA, "init": str(checkpoint), **DB, **options},
    )


def test_class_images_are_the_base_models_generated_once_and_reused(tmp_path, tiny_checkpoint):
    config = _config(tmp_path, tiny_checkpoint)
    first = make_dreambooth_task(config)
    assert isinstance(first, DreamBoothLoRA)
    pairs = first.dataset("train")
    assert first.generated == 3
    folder = tmp_path / "run" / "class_images"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 3
    # what the pipeline makes of the class prompt at seed class_seed + i with the untouched model
    request = GenerationRequest(
        prompt_seeds=(("a photo of shape", 1),),
        steps=2,
        sampler="Euler a",
        cfg_scale=7.0,
        width=16,
        height=16,
    )
    import latentforge

    expected = next(iter(iter_images(latentforge.load(tiny_checkpoint), request, progress=False))).image
    saved = Image.open(folder / "00001.png")
    difference = torch.tensor(list(saved.getdata())) - torch.tensor(list(expected.getdata()))
    assert difference.abs().max() <= 1
    item = pairs[1]
    assert item["class_caption"] == "a photo of shape" and item["class_pixels"].shape == (3, 16, 16)
    stamps = [p.stat().st_mtime_ns for p in images]
    again = make_dreambooth_task(config)
    again.dataset("train")
    assert again.generated == 0 and [p.stat().st_mtime_ns for p in images] == stamps
    (folder / "00002.png").unlink()  # a run killed while generating: only the missing one is made
    third = make_dreambooth_task(config)
    third.dataset("train")
    assert third.generated == 1


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_dreambooth_trains_with_prior_loss(tmp_path, tiny_checkpoint, mode):
    options = {"mode": mode} | ({"rank": 2} if mode == "lora" else {})
    config = _config(tmp_path, tiny_checkpoint, steps=6, **options)
    task = make_dreambooth_task(config)
    assert isinstance(task, DreamBoothLoRA if mode == "lora" else DreamBoothFull)
    batch = torch.utils.data.default_collate([task.dataset("train")[i] for i in range(2)])
    loss, metrics = task.loss(task.trainable(), batch, torch.Generator().manual_seed(0))
    assert {"instance_loss", "prior_loss"} <= set(metrics)
    assert loss.item() == pytest.approx(metrics["instance_loss"] + metrics["prior_loss"], rel=1e-5)
    captions = task.prepare_captions(batch, torch.Generator().manual_seed(0))["caption"]
    assert captions == ["a photo of sks shape"] * 2
    train(task, config)
    assert (tmp_path / "run" / "final.safetensors").is_file()


def test_without_prior_no_class_images(tmp_path, tiny_checkpoint):
    task = make_dreambooth_task(_config(tmp_path, tiny_checkpoint, prior_preservation=False))
    assert "class_pixels" not in task.dataset("train")[0]
    assert not (tmp_path / "run" / "class_images").exists()


def test_bad_options(tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match="class_word is required"):
        make_dreambooth_task(_config(tmp_path, tiny_checkpoint, class_word=""))
    with pytest.raises(ConfigError, match='only apply with mode = "lora"'):
        make_dreambooth_task(_config(tmp_path, tiny_checkpoint, mode="full", rank=8))
