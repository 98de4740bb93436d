"""Malicious pickles through every loading path: none of them may run (the marker file never appears), and
each load is refused with one `error:` line and exit code 2 (issue 19)."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import Payload, one_error_line, snapshot
from PIL import Image


def _payloads(marker: Path) -> dict[str, Callable[[Path], None]]:
    """Writers of one pickle file each; unpickling any of them would create `marker`."""
    touch = Payload(Path.touch, marker)
    shell = Payload(os.system, f"touch {marker}")
    code = Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    process = Payload(subprocess.call, ["touch", str(marker)])
    wrapped = {"state_dict": {"model.diffusion_model.x": touch}}  # the payload inside a normal-looking dict
    return {
        "pickle-touch": lambda path: path.write_bytes(pickle.dumps(touch, protocol=2)),
        "pickle-os-system": lambda path: path.write_bytes(pickle.dumps(shell, protocol=5)),
        "pickle-exec": lambda path: path.write_bytes(pickle.dumps(code)),
        "torch-zip-subprocess": lambda path: torch.save(process, path),
        "torch-zip-in-state-dict": lambda path: torch.save(wrapped, path),
        "torch-legacy": lambda path: torch.save(touch, path, _use_new_zipfile_serialization=False),
    }


PAYLOADS = list(_payloads(Path("x")))

UNET_OPTIONS = (
    "resolution = 16\nsynthetic_items = 8\nmax_holdout_items = 4\n"
    "unet = { model_channels = 16, norm_groups = 8, context_dim = 16, attention_levels = [1] }\n"
)
VAE_CONFIG = "vae_config = { ch = 8, ch_mult = [1, 2], norm_groups = 4 }\n"
TEXT_CONFIG = "text_encoder_config = { width = 16, layers = 1, heads = 2, mlp_width = 32 }\n"


def _train_config(root: Path, key: str, path: Path) -> Path:
    """A tiny `train unet` config whose `task_options.<key>` is the payload file."""
    options = UNET_OPTIONS.replace("unet = {", "unet_ = {") if key == "init" else UNET_OPTIONS
    options = options.replace("unet_ = ", "# ")
    if key != "vae" and key != "init":
        options += VAE_CONFIG
    if key != "text_encoder" and key != "init":
        options += TEXT_CONFIG
    config = root / f"train-{key}.toml"
    config.write_text(
        f'run_dir = "{root / "run"}"\nmax_steps = 1\nbatch_size = 4\ndevice = "cpu"\n'
        f'[task_options]\n{options}{key} = "{path}"\n'
    )
    return config


PATHS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "generate --model": lambda p, model, out: ["generate", "x", "--model", str(p), "--out", str(out)],
    "generate --vae": lambda p, model, out: [
        "generate", "x", "--model", str(model), "--vae", str(p), "--steps", "1", "--size", "32x32",
        "--out", str(out),
    ],
    "info": lambda p, model, out: ["info", str(p)],
    "convert": lambda p, model, out: ["convert", str(p), str(out / "converted.safetensors")],
    "convert --vae": lambda p, model, out: [
        "convert", str(model), str(out / "converted.safetensors"), "--vae", str(p)
    ],
    "train unet init": lambda p, model, out: ["train", "unet", str(_train_config(out.parent, "init", p))],
    "train unet vae": lambda p, model, out: ["train", "unet", str(_train_config(out.parent, "vae", p))],
    "train unet text_encoder": lambda p, model, out: [
        "train", "unet", str(_train_config(out.parent, "text_encoder", p))
    ],
    "eval inception:": lambda p, model, out: [
        "eval", "--generated", str(out.parent / "gen"), "--reference", str(out.parent / "gen"),
        "--features", f"inception:{p}", "--metrics", "fid", "--out", str(out / "eval"),
    ],
    "eval clip:": lambda p, model, out: [
        "eval", "--generated", str(out.parent / "gen"), "--reference", str(out.parent / "gen"),
        "--features", f"clip:{p}", "--metrics", "fid", "--out", str(out / "eval"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("way_in", list(PATHS))
def test_payload_never_runs(way_in, payload, tiny_checkpoint, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    suffix = ".pth" if way_in.startswith("eval") else ".ckpt"
    path = tmp_path / f"payload{suffix}"
    _payloads(marker)[payload](path)
    (tmp_path / "gen").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (100 * i, 20, 30)).save(tmp_path / "gen" / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    line = one_error_line(capsys, PATHS[way_in](path, tiny_checkpoint, out))
    assert not marker.exists(), f"{way_in} ran the {payload} payload"
    assert snapshot(out) == before and not (tmp_path / "run").exists()
    assert "payload" in line, line  # the error names the file
