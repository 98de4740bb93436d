"""The U-Net training task: learning, objectives, caption dropout, latent scale, cache, export and load."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from latentforge.checkpoints.exports import load_text_encoder, save_vae
from latentforge.checkpoints.hashing import weights_digest
from latentforge.models.configs import TextEncoderConfig, config_to_json
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.training.latent_cache import LatentCache, cache_key
from latentforge.training.tasks.unet import UNetTask

TINY = {
    "resolution": 16,
    "synthetic_items": 8,
    "max_holdout_items": 4,
    "vae_config": {"ch": 8, "ch_mult": [1, 2], "norm_groups": 4},
    "text_encoder_config": {"width": 16, "layers": 1, "heads": 2, "mlp_width": 32},
    "unet": {"model_channels": 16, "norm_groups": 8, "context_dim": 16, "attention_levels": [1]},
    "eval_timesteps": [200, 600],
    "sample_steps": 3,
    "sample_seeds": [0],
}


def _task(seed: int = 0, **options) -> UNetTask:
    return UNetTask({**TINY, **options}, seed=seed, progress=False)


def _batch(task: UNetTask, n: int = 8) -> dict:
    dataset = task.dataset("train")
    items = [dataset[i] for i in range(n)]
    return torch.utils.data.default_collate(items)


def _train(task: UNetTask, steps: int, lr: float = 2e-3) -> None:
    model = task.trainable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batch, generator = _batch(task), torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = task.loss(model, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_holdout_loss_decreases(prediction):
    task = _task(prediction=prediction, min_snr_gamma=5.0, noise_offset=0.05)
    before = task.evaluate(task.trainable())
    _train(task, 30)
    after = task.evaluate(task.trainable())
    assert set(after) == {"loss_t200", "loss_t600", "loss"}
    assert after["loss"] < 0.85 * before["loss"]
    assert task.evaluate(task.trainable()) == after  # fixed timesteps and seeds


def test_only_the_unet_trains():
    task = _task()
    loss, _ = task.loss(task.trainable(), _batch(task, 2), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in task.trainable().parameters())
    assert not any(p.requires_grad for p in [*task.vae.parameters(), *task.text_encoder.parameters()])


def test_latent_scale_normalises_the_training_latents():
    task = _task(synthetic_items=16)
    scale = task.latent_scale
    z, _ = task.latents_and_context(_batch(task, 16), torch.Generator().manual_seed(0))
    assert float(z.std()) == pytest.approx(1.0, abs=0.1)
    assert z.std() / scale == pytest.approx(float(z.std()) / scale)  # z already carries the scale
    assert _task(synthetic_items=16, latent_scale=0.5).latent_scale == 0.5


def test_caption_dropout_replaces_captions_by_the_empty_prompt():
    task = _task()
    batch = _batch(task, 4)
    _, dropped = task.latents_and_context(batch, torch.Generator().manual_seed(0), caption_dropout=1.0)
    empty = task.encode_text(task.tokenizer([""]))
    torch.testing.assert_close(dropped, empty.expand(4, -1, -1))
    _, kept = task.latents_and_context(batch, torch.Generator().manual_seed(0), caption_dropout=0.0)
    torch.testing.assert_close(kept, task.encode_text(task.tokenizer(batch["caption"])))


def test_gradient_checkpointing_flag_reaches_the_unet():
    task = _task(gradient_checkpointing=True)
    assert task.trainable().gradient_checkpointing
    loss, _ = task.loss(task.trainable(), _batch(task, 2), torch.Generator().manual_seed(0))
    loss.backward()


def test_mismatched_unet_config_is_explained():
    with pytest.raises(ValueError, match="context_dim = 32 but"):
        _task(unet={"model_channels": 16, "norm_groups": 8, "context_dim": 32})


@pytest.mark.parametrize("cache_text", ["ids", "hidden"])
def test_cache_hit_miss_and_same_loss(tmp_path, cache_text):
    options = {"cache": True, "cache_dir": str(tmp_path), "cache_text": cache_text, "caption_dropout": 0.5}
    first = _task(**options)
    first.dataset("train")
    assert first.cache_hit is False
    second = _task(**options)
    second.dataset("train")
    assert second.cache_hit is True
    assert second.latent_scale == pytest.approx(first.latent_scale)
    # A cached batch gives the loss an uncached batch gives, for the same generator.
    uncached = _task(caption_dropout=0.5)
    cached_loss, _ = second.loss(second.trainable(), _batch(second, 4), torch.Generator().manual_seed(3))
    plain_loss, _ = uncached.loss(uncached.trainable(), _batch(uncached, 4), torch.Generator().manual_seed(3))
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-4, atol=1e-5)
    # Other VAE weights (another seed), another dataset, or another latent mode: a new key, a miss.
    for changed in (
        _task(seed=1, **options),
        _task(**options, synthetic_items=12),
        _task(**options, sample_posterior=False),
    ):
        changed.dataset("train")
        assert changed.cache_hit is False
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1 + 3  # the first, 3 more


def test_cache_key_and_store(tmp_path):
    module = torch.nn.Linear(2, 2)
    digest = weights_digest(module)
    assert digest == weights_digest(module.state_dict())
    with torch.no_grad():
        module.weight[0, 0] += 1
    assert weights_digest(module) != digest
    key = cache_key(vae=digest, data={"items": 3})
    assert key != cache_key(vae=digest, data={"items": 4})
    cache = LatentCache(tmp_path, key)
    assert not cache.exists()
    cache.write({"mean": torch.ones(3, 2)}, {"note": "x"})
    assert cache.exists() and cache.info()["note"] == "x"
    torch.testing.assert_close(cache.load()["mean"], torch.ones(3, 2))


def test_cache_refuses_random_views(tmp_path):
    with pytest.raises(ValueError, match="center_crop"):
        _task(cache=True, cache_dir=str(tmp_path), flip=True).dataset("train")


def test_samples_grid():
    task = _task(sample_prompts=["a red circle", "a blue square"], sample_seeds=[0, 1])
    image = task.samples(task.trainable())
    assert image is not None and image.size == (2 * 16, 2 * 16)


def test_frozen_encoders_load_from_files(tmp_path):
    """A VAE exported by the VAE task and a text encoder in our key layout with its config in metadata."""
    reference = _task()
    vae_path, text_path = tmp_path / "vae.safetensors", tmp_path / "text.safetensors"
    save_vae(reference.vae, vae_path)
    text_config = TextEncoderConfig(**TINY["text_encoder_config"])
    save_file(
        {k: v.contiguous() for k, v in reference.text_encoder.state_dict().items()},
        str(text_path),
        metadata={"latentforge.text_encoder_config": config_to_json(text_config)},
    )
    options = {k: v for k, v in TINY.items() if k not in ("vae_config", "text_encoder_config")}
    task = UNetTask({**options, "vae": str(vae_path), "text_encoder": str(text_path)}, progress=False)
    assert weights_digest(task.vae) == weights_digest(reference.vae)
    assert weights_digest(task.text_encoder) == weights_digest(reference.text_encoder)
    assert task.latent_scale == pytest.approx(reference.latent_scale)
    # Without the metadata the config must be given; the error says how.
    save_file({k: v.contiguous() for k, v in CLIPTextModel(text_config).state_dict().items()}, str(text_path))
    with pytest.raises(ValueError, match="text_encoder_config"):
        load_text_encoder(text_path)
    assert load_text_encoder(text_path, text_config).config == text_config


def test_export_loads_and_generates(tmp_path):
    import latentforge

    task = _task(prediction="v", clip_skip=1)
    _train(task, 2)
    path = tmp_path / "model.safetensors"
    task.export(task.trainable(), path)
    model = latentforge.load(path)
    assert model.family.name == "custom" and model.family.prediction == "v"
    assert model.family.latent_scale == pytest.approx(task.latent_scale)
    assert model.family.default_size == 16
    for ours, loaded in (
        (task.unet, model.unet),
        (task.vae, model.vae),
        (task.text_encoder, model.text_encoder),
    ):
        assert weights_digest(ours) == weights_digest(loaded)
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    request = GenerationRequest(prompt="a red circle", steps=3, sampler="Euler", seed=1, cfg_scale=3.0)
    result = run(model, request, progress=False)
    pixels = torch.tensor(list(result[0].image.getdata()), dtype=torch.float32)
    assert result[0].image.size == (16, 16) and torch.isfinite(result[0].latents).all()
    assert pixels.std() > 0
    assert json.loads(json.dumps(model.family.vae.ch_mult)) == [1, 2]


def test_runs_through_the_training_loop(tmp_path):
    from latentforge.training.config import RunConfig
    from latentforge.training.loop import train
    from latentforge.training.tasks.unet import make_unet_task

    config = RunConfig(
        run_dir=str(tmp_path / "run"),
        task="unet",
        max_steps=3,
        batch_size=4,
        lr=1e-3,
        device="cpu",
        checkpoint_every=0,
        gradient_checkpointing=True,
        task_options=TINY,
    )
    artefact = train(make_unet_task(config), config)
    import latentforge

    assert latentforge.load(artefact).family.name == "custom"
    assert (tmp_path / "run").is_dir()


def test_text_tower_of_a_clip_export(tmp_path):
    """`train clip` exports (whole CLIP and its text tower, with projection) feed the U-Net task."""
    clip_task = pytest.importorskip("latentforge.training.tasks.clip")
    from latentforge.models.clip import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig())
    whole, tower = tmp_path / "clip.safetensors", tmp_path / "clip.text_encoder.safetensors"
    clip_task.save_clip(clip, whole)
    clip_task.save_text_encoder(clip.text, tower)
    options = {k: v for k, v in TINY.items() if k != "text_encoder_config"}
    options["unet"] = {**TINY["unet"], "context_dim": clip.config.text.width}
    for path in (whole, tower):
        task = UNetTask({**options, "text_encoder": str(path)}, progress=False)
        assert weights_digest(task.text_encoder) == weights_digest(clip.text)
    export = tmp_path / "model.safetensors"
    task.export(task.trainable(), export)  # the pooled projection is not part of an SD checkpoint
    import latentforge

    model = latentforge.load(export)
    assert model.family.text_encoder.projection_dim is None
    ids = model.tokenizer(["a red circle"])
    torch.testing.assert_close(model.text_encoder(ids)[0], task.text_encoder(ids)[0])


def test_one_family_drives_the_task_and_is_what_the_export_loads(tmp_path):
    import latentforge

    task = _task(prediction="v", beta_schedule="linear", beta_start=0.001, beta_end=0.02, clip_skip=2)
    family = task.family
    assert (family.prediction, family.beta_schedule, family.default_clip_skip) == ("v", "linear", 2)
    assert family.latent_scale == task.latent_scale != 1.0  # measured, not the placeholder
    assert family.unet is task.unet.config and family.default_size == 16
    path = tmp_path / "model.safetensors"
    task.export(task.trainable(), path)
    assert latentforge.load(path).family == family


def test_sample_grid_is_what_the_pipeline_makes_of_the_export(tmp_path):
    """The preview grid comes from the generation pipeline: the exported model gives the same images."""
    import latentforge
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    task = _task(sample_prompts=prompts, sample_seeds=seeds, sample_steps=3, sample_cfg=4.0)
    _train(task, 2)
    grid = task.samples(task.trainable())
    path = tmp_path / "model.safetensors"
    task.export(task.trainable(), path)
    model = latentforge.load(path)
    for row, prompt in enumerate(prompts):
        for column, seed in enumerate(seeds):
            request = GenerationRequest(prompt=prompt, seed=seed, steps=3, sampler="Euler", cfg_scale=4.0)
            image = run(model, request, progress=False)[0].image
            tile = grid.crop((16 * column, 16 * row, 16 * column + 16, 16 * row + 16))
            difference = torch.tensor(list(image.getdata())) - torch.tensor(list(tile.getdata()))
            assert difference.abs().max() <= 1  # batch of 2 vs 1: float rounding only


def test_init_from_a_saved_model_starts_at_its_weights_and_keeps_its_family(tmp_path):
    from safetensors.torch import load_file

    import latentforge
    from latentforge.errors import ConfigError
    from latentforge.training.config import RunConfig
    from latentforge.training.loop import train
    from latentforge.training.tasks.unet import make_unet_task

    source = _task(prediction="v")
    _train(source, 2)
    saved = tmp_path / "saved.safetensors"
    source.export(source.trainable(), saved)
    data = {k: TINY[k] for k in ("resolution", "synthetic_items", "max_holdout_items")}
    config = RunConfig(
        run_dir=str(tmp_path / "run"),
        task="unet",
        max_steps=0,  # export the starting point
        batch_size=4,
        device="cpu",
        seed=7,  # another seed: fresh weights would differ
        task_options={**data, "init": str(saved), "prediction": "v", "family_name": "continued"},
    )
    task = make_unet_task(config)
    assert task.family == replace(source.family, name="continued")  # latent scale not re-measured
    artefact = train(task, config)
    start, expected = load_file(artefact), load_file(saved)
    unet_keys = [k for k in expected if k.startswith("model.diffusion_model.")]
    assert unet_keys and all(torch.equal(start[k], expected[k]) for k in unet_keys)
    assert latentforge.load(artefact).family.prediction == "v"
    with pytest.raises(ConfigError, match="task_options.prediction = 'epsilon' differs from the 'v'"):
        UNetTask({**data, "init": str(saved), "prediction": "epsilon"}, progress=False)
    with pytest.raises(ConfigError, match="task_options vae_config cannot be set with it"):
        UNetTask({**data, "init": str(saved), "vae_config": TINY["vae_config"]}, progress=False)


def test_dropout_acts_while_training_only_and_adds_no_weights():
    plain, dropped = _task(), _task(dropout=0.2)
    assert set(dropped.unet.state_dict()) == set(plain.unet.state_dict())
    batch = _batch(plain, 4)
    generator = torch.Generator
    losses = [
        t.loss(t.trainable().train(), batch, generator().manual_seed(0))[0].item() for t in (plain, dropped)
    ]
    assert abs(losses[0] - losses[1]) > 1e-4 * losses[0]  # same weights and draws: only dropout differs
    assert dropped.evaluate(dropped.trainable()) == plain.evaluate(plain.trainable())
    with pytest.raises(ValueError, match="dropout"):
        _task(dropout=1.0)
