"""Full fine-tuning from a checkpoint: text encoder at its own lr, buckets, captions, export that reloads."""

import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentforge
from latentforge.data.buckets import bucket_batch_order
from latentforge.data.captions import apply_template, check_template, process_caption, shuffle_caption
from latentforge.errors import ConfigError
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import iter_images
from latentforge.training.config import RunConfig
from latentforge.training.loop import make_optimizer, train
from latentforge.training.tasks.unet import UNetTask, UNetWithText, make_unet_task

DATA = {"resolution": 16, "synthetic_items": 8, "max_holdout_items": 4, "eval_timesteps": [300, 600]}


def test_shuffle_caption_keeps_the_first_tags():
    caption = "sks, dog, red, sitting, grass, sunny"
    rng = random.Random(0)
    seen = {shuffle_caption(caption, rng, keep_tokens=2) for _ in range(30)}
    assert len(seen) > 5
    for text in seen:
        tags = text.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(caption.split(", "))
    assert shuffle_caption(caption, random.Random(1), keep_tokens=6) == caption


def test_caption_template():
    assert apply_template("a photo of {token} {class}", token="sks", class_word="dog") == "a photo of sks dog"
    assert apply_template("{caption}, {token}", token="xyz", caption="a cat") == "a cat, xyz"
    assert process_caption("b, a", random.Random(0), template="photo of {class}", class_word="dog") == (
        "photo of dog"
    )
    with pytest.raises(ConfigError, match=r"unknown field \{name\}"):
        check_template("a photo of {name}")


def test_bucket_batch_order_is_one_bucket_per_batch_and_seeded():
    ids = [0] * 7 + [1] * 5 + [2] * 2
    order = bucket_batch_order(ids, 2, torch.Generator().manual_seed(0))
    assert len(order) == 6 + 4 + 2
    for batch in order.split(2):
        assert len({ids[i] for i in batch.tolist()}) == 1
    again = bucket_batch_order(ids, 2, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)
    assert not torch.equal(order, bucket_batch_order(ids, 2, torch.Generator().manual_seed(1)))


def _config(tmp_path, checkpoint, steps: int, **options) -> RunConfig:
    return RunConfig(
        run_dir=str(tmp_path / "run"),
        task="unet",
        max_steps=steps,
        batch_size=4,
        lr=2e-3,
        lr_schedule="constant",
        device="cpu",
        checkpoint_every=0,
        log_every=1,
        task_options={**DATA, "init": str(checkpoint), **options},
    )


def test_finetune_with_text_encoder_learns_and_exports_a_loadable_file(tmp_path, tiny_checkpoint):
    config = _config(
        tmp_path, tiny_checkpoint, 25, train_text_encoder=True, text_encoder_lr=1e-3, min_snr_gamma=5.0
    )
    task = make_unet_task(config)
    model = task.trainable()
    assert isinstance(model, UNetWithText)
    optimizer = make_optimizer(model, config, task.param_groups(model, config.lr))
    scales = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scales[id(task.text_encoder.text_model.encoder.layers[0].mlp.fc1.weight)] == pytest.approx(0.5)
    assert scales[id(task.unet.out[2].weight)] == 1.0
    assert all(p.requires_grad for p in model.parameters())  # `load` returns frozen models: all train here
    before = task.evaluate(model)["loss"]
    artefact = train(task, config)
    after = task.evaluate(task.trainable())["loss"]
    assert after < 0.9 * before
    exported, original = load_file(artefact), load_file(tiny_checkpoint)
    text_key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    vae_key = next(k for k in original if k.startswith("first_stage_model."))
    assert not torch.equal(exported[text_key], original[text_key])  # the text encoder trained
    assert torch.equal(exported[vae_key], original[vae_key])  # the VAE did not
    reloaded = latentforge.load(artefact)
    request = GenerationRequest(prompt="a red circle", seed=1, steps=3, sampler="Euler", width=16, height=16)
    image = next(iter(iter_images(reloaded, request, progress=False))).image
    assert image.size == (16, 16)


def test_text_encoder_stays_frozen_by_default(tiny_checkpoint):
    task = UNetTask({**DATA, "init": str(tiny_checkpoint)}, progress=False)
    assert task.trainable() is task.unet
    assert not any(p.requires_grad for p in task.text_encoder.parameters())


def _folder(root, sizes):
    root.mkdir(parents=True)
    colours = ["red", "green", "blue", "white"]
    for i, (w, h) in enumerate(sizes):
        colour = colours[i % len(colours)]
        Image.new("RGB", (w, h), colour).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"{colour}, square, flat")
    return root


def test_buckets_batch_by_aspect_and_record_size_conditioning(tmp_path, tiny_checkpoint):
    sizes = [(32, 16)] * 4 + [(16, 32)] * 4 + [(20, 20)] * 2
    train_dir = _folder(tmp_path / "train", sizes)
    holdout = _folder(tmp_path / "holdout", [(20, 20)] * 2)
    options = {
        "train_data": str(train_dir),
        "holdout_data": str(holdout),
        "data": "folder",
        "buckets": True,
        "shuffle_caption": True,
        "keep_tokens": 1,
        "caption_template": "{caption}, emoji",
    }
    config = _config(tmp_path, tiny_checkpoint, 6, **options)
    config.batch_size = 2
    task = make_unet_task(config)
    dataset = task.dataset("train")
    shapes = {tuple(dataset[i]["pixels"].shape) for i in range(len(sizes))}
    assert shapes == {(3, 8, 24), (3, 24, 8), (3, 16, 16)}  # wide, tall, square buckets at ~16*16 px
    assert dataset[0]["original_size"].tolist() == [16, 32] and "crop_top_left" in dataset[0]
    seen: list[tuple[int, ...]] = []
    original_loss = task.loss

    def recording_loss(model, batch, generator):
        seen.append(tuple(batch["pixels"].shape))
        return original_loss(model, batch, generator)

    task.loss = recording_loss  # type: ignore[method-assign]
    train(task, config)
    assert len(seen) == 6 and len({s[2:] for s in seen}) >= 2  # several buckets, one per batch
    with pytest.raises(ConfigError, match="buckets = false"):
        UNetTask(
            {
                **DATA,
                **options,
                "init": str(tiny_checkpoint),
                "cache": True,
                "shuffle_caption": False,
                "caption_template": None,
                "cache_dir": str(tmp_path / "c"),
            },
            progress=False,
        ).dataset("train")
