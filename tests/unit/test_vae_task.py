"""The VAE training task: loss goes down, f=4/f=8, the GAN terms reach the right weights, export, loop."""

import pytest
import torch

from latentforge.checkpoints.exports import load_vae, read_vae_state_dict
from latentforge.models.families import TINY
from latentforge.training import losses
from latentforge.training.tasks.vae import VAETask

TINY_VAE = {"ch": 8, "ch_mult": [1, 2], "norm_groups": 4}


def _task(**options) -> VAETask:
    base = {
        "resolution": 16,
        "synthetic_items": 8,
        "max_holdout_items": 4,
        "vae": TINY_VAE,
        "sample_images": 3,
    }
    return VAETask({**base, **options}, seed=0)


def _batch(task: VAETask, n: int = 8) -> dict[str, torch.Tensor]:
    dataset = task.dataset("train")
    return {"pixels": torch.stack([dataset[i]["pixels"] for i in range(n)])}


def _train(task: VAETask, steps: int, lr: float = 2e-3) -> list[float]:
    model = task.trainable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batch, generator, history = _batch(task), torch.Generator().manual_seed(0), []
    for _ in range(steps):
        loss, metrics = task.loss(model, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics["rec"])
    return history


def test_reconstruction_loss_decreases_and_psnr_improves():
    task = _task()
    before = task.evaluate(task.trainable())
    history = _train(task, 25)
    after = task.evaluate(task.trainable())
    assert history[-1] < 0.8 * history[0]
    assert after["psnr"] > before["psnr"] + 1.0
    assert after["l1"] < before["l1"]
    assert set(after) == {"psnr", "ssim", "l1"}


@pytest.mark.parametrize(("ch_mult", "factor"), [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_downsampling_factors(ch_mult, factor):
    task = _task(vae={**TINY_VAE, "ch_mult": list(ch_mult)})
    assert task.trainable().vae.config.downsampling_factor == factor
    posterior = task.trainable().vae.encode(_batch(task, 2)["pixels"])
    assert posterior.mean.shape == (2, 4, 16 // factor, 16 // factor)
    loss, metrics = task.loss(task.trainable(), _batch(task, 2), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and metrics["kl"] >= 0


def test_resolution_must_fit_the_factor():
    with pytest.raises(ValueError, match="multiple"):
        _task(resolution=17)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="valid options: .*kl_weight"):
        VAETask({"kl_wieght": 1.0})


def test_gan_terms_train_the_right_weights():
    """One summed loss: the discriminator gets only the hinge-D gradient, the VAE only rec + KL + G."""
    task = _task(resolution=32, gan=True, disc_start=0, disc_width=8, disc_layers=2, adaptive_weight=False)
    model = task.trainable()
    batch = _batch(task, 4)
    loss, metrics = task.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    disc_grads = [p.grad.clone() for p in model.discriminator.parameters()]
    vae_grads = [p.grad.clone() for p in model.vae.parameters()]
    assert int(model.micro_steps) == 1

    # The discriminator's gradient equals that of the hinge-D loss on the same reconstruction alone.
    model.zero_grad()
    with torch.no_grad():
        recon, _ = model.vae(batch["pixels"], generator=torch.Generator().manual_seed(0))
    d_loss = losses.hinge_d_loss(model.discriminator(batch["pixels"]), model.discriminator(recon))
    d_loss.backward()
    for ours, alone in zip(disc_grads, (p.grad for p in model.discriminator.parameters()), strict=True):
        torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-6)

    # The VAE's gradient equals that of rec + kl_weight * kl + disc_weight * G (D's loss does not reach it).
    model.zero_grad()
    recon, posterior = model.vae(batch["pixels"], generator=torch.Generator().manual_seed(0))
    g_loss = losses.hinge_g_loss(model.discriminator(recon))
    vae_loss = (
        losses.reconstruction_loss(batch["pixels"], recon)
        + 1e-6 * losses.kl_loss(posterior.kl(), batch["pixels"][0].numel())
        + 0.5 * g_loss
    )
    vae_loss.backward()
    for ours, alone in zip(vae_grads, (p.grad for p in model.vae.parameters()), strict=True):
        torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-7)
    assert metrics["d_loss"] > 0


def test_gan_is_off_until_disc_start():
    task = _task(resolution=32, gan=True, disc_start=2, disc_width=8, disc_layers=2)
    model = task.trainable()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, metrics = task.loss(model, _batch(task, 2), generator)
        assert metrics["loss"] == pytest.approx(metrics["rec"] + 1e-6 * metrics["kl"], rel=1e-5)
    loss, metrics = task.loss(model, _batch(task, 2), generator)
    assert metrics["loss"] != pytest.approx(metrics["rec"] + 1e-6 * metrics["kl"], rel=1e-5)
    assert metrics["disc_weight"] > 0


def test_samples_grid_is_originals_over_reconstructions():
    task = _task(synthetic_items=16)  # 4 holdout images, 3 shown
    image = task.samples(task.trainable())
    assert image is not None and image.size == (3 * 16, 2 * 16)


def test_export_is_a_standalone_vae(tmp_path):
    task = _task()
    _train(task, 2)
    path = tmp_path / "vae.safetensors"
    task.export(task.trainable(), path)
    expected = task.trainable().vae.state_dict()
    # Bare original-layout keys, readable as a standalone VAE by the checkpoint loader.
    state_dict = read_vae_state_dict(path, TINY)
    assert state_dict.keys() == expected.keys()
    assert all(not k.startswith("first_stage_model.") for k in state_dict)
    loaded = load_vae(path)
    assert loaded.config == task.trainable().vae.config
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def _train_in_loop(tmp_path, task_options: dict, **config) -> str:
    """A short `latentforge train vae` run on synthetic data; returns the exported VAE file."""
    from latentforge.training.config import RunConfig
    from latentforge.training.loop import train
    from latentforge.training.tasks.vae import make_vae_task

    base = {"resolution": 16, "synthetic_items": 8, "max_holdout_items": 4}
    run = RunConfig(
        **{"run_dir": str(tmp_path / "run"), "task": "vae", "max_steps": 3, "batch_size": 4, "lr": 1e-3,
           "device": "cpu", "checkpoint_every": 0, **config},
        task_options={**base, **task_options},
    )  # fmt: skip
    return train(make_vae_task(run), run)


def test_runs_through_the_training_loop(tmp_path):
    artefact = _train_in_loop(tmp_path, {"vae": TINY_VAE})
    assert load_vae(artefact).config.ch == 8


def test_decoder_fine_tuning_keeps_the_latent_space(tmp_path):
    """frozen_encoder: the loop trains decoder weights only; encoder and quant_conv stay bit-identical."""
    start = _task()
    _train(start, 3)
    init = tmp_path / "vae.safetensors"
    start.export(start.trainable(), init)
    artefact = _train_in_loop(
        tmp_path, {"init": str(init), "frozen_encoder": True}, max_steps=4, weight_decay=0.1
    )
    before, after = load_vae(init).state_dict(), load_vae(artefact).state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert not torch.equal(before["post_quant_conv.weight"], after["post_quant_conv.weight"])
    with pytest.raises(ValueError, match="init"):
        _task(frozen_encoder=True)


def test_latent_noise_decodes_noisy_latents_in_a_decoder_fine_tune(tmp_path):
    """latent_noise: the decoder sees z + s * std(z) * noise, s in [0, latent_noise] per image; off (0) it
    decodes exactly what AutoencoderKL.forward does with the same generator, so earlier runs are unchanged."""
    start = _task()
    init = tmp_path / "vae.safetensors"
    start.export(start.trainable(), init)
    x = _batch(start)["pixels"]
    decoded = {}
    for noise in (0.0, 0.5):
        task = _task(init=str(init), frozen_encoder=True, latent_noise=noise)
        trainer = task.trainable()
        hook = trainer.vae.post_quant_conv.register_forward_pre_hook(
            lambda m, args, noise=noise: decoded.setdefault(noise, args[0])
        )
        out = trainer(x, True, torch.Generator().manual_seed(3), noise)
        hook.remove()
        if noise == 0.0:
            expected, _ = trainer.vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
            assert torch.equal(out["recon"], expected)
    z = decoded[0.0]
    relative = (decoded[0.5] - z).flatten(1).std(1) / z.std()
    assert relative.min() > 0 and relative.max() <= 0.5 * 1.2  # levels drawn per image, at most 0.5 std
    assert relative.max() - relative.min() > 0.05
    with pytest.raises(ValueError, match="frozen_encoder"):
        _task(latent_noise=0.1)


def test_rfid_with_an_inception_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from latentforge.evaluation.inception import random_fid_inception
    from latentforge.training.tasks import vae as vae_module

    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in random_fid_inception(0).state_dict().items()}, str(weights))
    task = _task(max_holdout_items=2, rfid_inception=str(weights))
    images = torch.stack([task.dataset("holdout")[i]["pixels"] for i in range(2)])
    with pytest.warns(UserWarning, match="rank-deficient"):  # 2 images: fine for a wiring test
        assert vae_module.reconstruction_fid(images, images, str(weights)) == pytest.approx(0.0, abs=1e-6)
    # evaluate() passes the holdout originals and reconstructions.
    seen = {}
    monkeypatch.setattr(
        vae_module, "reconstruction_fid", lambda a, b, path: seen.update(a=a, b=b, path=path) or 1.5
    )
    assert task.evaluate(task.trainable())["rfid"] == 1.5
    torch.testing.assert_close(seen["a"], images)
    assert seen["b"].shape == images.shape and seen["path"] == str(weights)


def test_rfid_clip_with_our_clip(tmp_path, monkeypatch):
    from latentforge.checkpoints.exports import save_clip
    from latentforge.models.clip import CLIPConfig, CLIPModel
    from latentforge.training.tasks import vae as vae_module

    clip = tmp_path / "clip.safetensors"
    save_clip(CLIPModel(CLIPConfig()), clip)
    task = _task(rfid_clip=str(clip))
    holdout = task.dataset("holdout")
    images = torch.stack([holdout[i]["pixels"] for i in range(len(holdout))])
    other = images.flip(-1)
    with pytest.warns(UserWarning, match="rank-deficient"):  # 2 images: fine for a wiring test
        assert vae_module.reconstruction_fid(images, images, clip_path=str(clip)) == pytest.approx(
            0, abs=1e-6
        )
        expected = vae_module.reconstruction_fid(images, other, clip_path=str(clip))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as in the loop's eval: features stay float32
            assert vae_module.reconstruction_fid(images, other, clip_path=str(clip)) == expected
    with pytest.raises(ValueError, match="exactly one"):
        vae_module.reconstruction_fid(images, images)
    seen = {}
    monkeypatch.setattr(
        vae_module, "reconstruction_fid", lambda a, b, clip_path: seen.update(b=b, path=clip_path) or 0.25
    )
    assert task.evaluate(task.trainable())["rfid_clip"] == 0.25
    assert seen["b"].shape == images.shape and seen["path"] == str(clip)
