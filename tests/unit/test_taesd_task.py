"""`latentforge train taesd`: a tiny decoder distilled from the model's VAE trains, evaluates, exports, and
the export loads with `read_taesd` and decodes as the trained module does."""

from __future__ import annotations

import torch

from latentforge.checkpoints.taesd import read_taesd
from latentforge.training.loop import run_training


def test_train_taesd_smoke(tiny_checkpoint, tmp_path):
    overrides = [
        f"run_dir={tmp_path / 'run'}", "max_steps=12", "batch_size=4", "lr=3e-3", "eval_every=12",
        "sample_every=12", "checkpoint_every=12", "log_every=6", "device=cpu",
        f"task_options.model={tiny_checkpoint}", "task_options.data=synthetic", "task_options.resolution=16",
        "task_options.synthetic_items=16", "task_options.max_holdout_items=4", "task_options.channels=8",
    ]  # fmt: skip
    out = run_training("taesd", None, overrides)
    taesd = read_taesd(out if out.is_file() else out / "final.safetensors")
    assert taesd.encoder is None and taesd.downsampling_factor == 2  # TINY's VAE is f = 2
    z = torch.randn(1, 4, 8, 8)
    assert taesd.decode(z).shape == (1, 3, 16, 16)
