"""SDXL through the U-Net task on the tiny SDXL family: the `vector` training builds equals generation's,
loss falls, a stopped run resumes bit-exact, the export reloads as SDXL and generates (issue 21 item 4)."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentforge
from latentforge.errors import ConfigError
from latentforge.models.families import TINY_XL, TINY_XL_REFINER
from latentforge.models.unet import vector_conditioning
from latentforge.pipelines.request import GenerationRequest, SizeConditioning
from latentforge.pipelines.runner import iter_images
from latentforge.pipelines.sdxl_conditioning import SDXLConditioner, size_numbers
from latentforge.training.config import RunConfig
from latentforge.training.loop import train
from latentforge.training.tasks.unet import UNetTask, make_unet_task
from references import save_random_model

DATA = {"resolution": 32, "synthetic_items": 8, "max_holdout_items": 2, "eval_timesteps": [300, 600]}


def _save(family, path):  # noqa: ANN001, ANN202
    save_random_model(family, path)
    return path


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory):
    return _save(TINY_XL, tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors")


def _config(run_dir, checkpoint, steps: int, **options) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir),
        task="unet",
        max_steps=steps,
        batch_size=4,
        lr=2e-3,
        lr_schedule="constant",
        device="cpu",
        checkpoint_every=2,
        log_every=1,
        task_options={**DATA, "init": str(checkpoint), "latent_scale": TINY_XL.latent_scale, **options},
    )


def test_training_vector_equals_what_generation_builds(xl_checkpoint):
    """Same caption and size/crop numbers: the task's (crossattn, vector) equal the SDXL conditioner's."""
    task = UNetTask({**DATA, "init": str(xl_checkpoint), "caption_dropout": 0.0}, progress=False)
    model = task.pipeline_model(task.unet)
    caption = "a red circle on a blue background"
    batch = {
        "pixels": torch.zeros(1, 3, 32, 48),
        "caption": [caption],
        "original_size": torch.tensor([[100, 140]]),
        "crop_top_left": torch.tensor([[7, 3]]),
    }
    _, context, vector = task.latents_and_cond(batch, None)
    # generation at width 48 x height 32 with A1111's (width, height) sizes and (top, left) crop
    size_cond = SizeConditioning(original_size=(140, 100), crop_top_left=(7, 3))
    numbers = size_numbers(size_cond, 48, 32)
    captured = {}

    def base(x, sigma, cond):
        captured.update(cond)
        return x

    conditioner = SDXLConditioner(model, TINY_XL.default_clip_skip, 1, numbers)
    denoiser = conditioner.denoiser(base, [caption], [""], torch.tensor([1.0, 0.0]), 1.0)
    denoiser(torch.zeros(1, 4, 4, 6), torch.tensor([1.0]))
    assert vector is not None and vector.shape == (1, TINY_XL.unet.adm_in_channels)
    torch.testing.assert_close(vector, captured["vector"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context, captured["crossattn"], rtol=1e-5, atol=1e-6)
    # another crop gives another vector (the numbers are really read from the batch)
    _, _, other = task.latents_and_cond({**batch, "crop_top_left": torch.tensor([[0, 0]])}, None)
    assert not torch.allclose(other, vector)


def test_caption_dropout_zeroes_text_and_pooled_but_keeps_sizes(xl_checkpoint):
    task = UNetTask({**DATA, "init": str(xl_checkpoint)}, progress=False)
    batch = {"pixels": torch.zeros(2, 3, 32, 32), "caption": ["a", "b"]}
    _, context, vector = task.latents_and_cond(batch, torch.Generator().manual_seed(0), caption_dropout=1.0)
    pooled_width = TINY_XL.text_encoder_2.projection_dim
    assert context.abs().max() == 0 and vector[:, :pooled_width].abs().max() == 0
    assert vector[:, pooled_width:].abs().max() > 0  # the six size/crop numbers' Fourier features stay


def test_sdxl_finetune_learns_resumes_exactly_and_exports_a_loadable_sdxl_file(
    tmp_path, xl_checkpoint, capsys
):
    config = _config(tmp_path / "full", xl_checkpoint, 4)
    task = make_unet_task(config)
    before = task.evaluate(task.trainable())["loss"]
    artefact = train(task, config)
    after = task.evaluate(task.trainable())["loss"]
    assert after < 0.9 * before, (before, after)
    # a copy of the run stopped at its step-2 checkpoint, continued to 4: the same weights, bit for bit
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "split" / "checkpoints")
    later = sorted((tmp_path / "split" / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in later] == ["step_2.pt", "step_4.pt"]
    later[1].unlink()
    split_config = _config(tmp_path / "split", xl_checkpoint, 4)
    capsys.readouterr()
    resumed = train(make_unet_task(split_config), split_config)
    assert "resuming from" in capsys.readouterr().out
    full, split = load_file(artefact), load_file(resumed)
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    original = load_file(xl_checkpoint)
    assert full.keys() == original.keys()  # the same sgm single-file layout A1111/ComfyUI read
    unet_key = "model.diffusion_model.label_emb.0.0.weight"
    assert not torch.equal(full[unet_key], original[unet_key])  # the U-Net (its vector input too) trained
    text_key = next(k for k in original if k.startswith("conditioner.embedders.1."))
    assert torch.equal(full[text_key], original[text_key])  # bigG stayed frozen
    reloaded = latentforge.load(artefact)
    assert reloaded.family.is_sdxl and reloaded.text_encoder_2 is not None
    request = GenerationRequest(prompt="a red circle", seed=1, steps=2, sampler="Euler", width=32, height=32)
    image = next(iter(iter_images(reloaded, request, progress=False))).image
    assert image.size == (32, 32)


def test_hidden_text_cache_matches_the_uncached_conditioning(tmp_path, xl_checkpoint):
    options = {**DATA, "init": str(xl_checkpoint), "latent_scale": TINY_XL.latent_scale}
    plain = UNetTask({**options, "sample_posterior": False}, progress=False)
    cached = UNetTask(
        {
            **options,
            "sample_posterior": False,
            "cache": True,
            "cache_text": "hidden",
            "cache_dir": str(tmp_path),
        },
        progress=False,
    )
    raw, rows = plain.dataset("holdout"), cached.dataset("holdout")
    batch = {
        k: torch.stack([raw[i][k] for i in range(2)]) if k == "pixels" else [raw[i][k] for i in range(2)]
        for k in ("pixels", "caption")
    }
    row = {k: torch.stack([rows[i][k] for i in range(2)]) for k in rows[0]}
    assert {"hidden", "pooled", "original_size", "crop_top_left"} <= row.keys()
    for got, want in zip(
        cached.latents_and_cond(row, None), plain.latents_and_cond(batch, None), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_refiner_and_sdxl_text_encoder_training_are_refused(tmp_path, xl_checkpoint):
    refiner = _save(TINY_XL_REFINER, tmp_path / "refiner.safetensors")
    with pytest.raises(ConfigError, match="refiner"):
        UNetTask({**DATA, "init": str(refiner)}, progress=False)
    with pytest.raises(ConfigError, match="train_text_encoder"):
        UNetTask({**DATA, "init": str(xl_checkpoint), "train_text_encoder": True}, progress=False)


def test_bucketed_data_feeds_each_images_original_size_and_crop(tmp_path, xl_checkpoint):
    folder = tmp_path / "train"
    folder.mkdir()
    for i, (w, h) in enumerate([(96, 40), (40, 96)]):
        Image.new("RGB", (w, h), "red").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("red")
    options = {**DATA, "data": "folder", "train_data": str(folder), "holdout_data": str(folder)}
    task = UNetTask({**options, "init": str(xl_checkpoint), "buckets": True}, progress=False)
    item = task.dataset("train")[0]
    assert item["original_size"].tolist() == [40, 96]  # (h, w) of the file, not of the bucket crop
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
    _, _, vector = task.latents_and_cond(batch, None)
    h, w = item["pixels"].shape[-2:]
    numbers = torch.tensor([[40.0, 96.0, *item["crop_top_left"].tolist(), h, w]])
    pooled_width = TINY_XL.text_encoder_2.projection_dim
    want = vector_conditioning(vector[:, :pooled_width], numbers, TINY_XL.unet.vector_embed_dim)
    torch.testing.assert_close(vector, want)
    _, _, fallback = task.latents_and_cond({"pixels": batch["pixels"], "caption": batch["caption"]}, None)
    assert not torch.allclose(fallback, vector)
