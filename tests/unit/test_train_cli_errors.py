"""Every training config, dataset, resume and divergence error a user can cause, through `latentforge train`:
exit code 2, one `error:` line naming the file or key, no traceback (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from latentforge.cli import main

VAE_OPTIONS = (
    "resolution = 16\nsynthetic_items = 8\nmax_holdout_items = 4\n"
    "vae = { ch = 8, ch_mult = [1, 2], norm_groups = 4 }\n"
)
UNET_OPTIONS = (
    "resolution = 16\nsynthetic_items = 8\nmax_holdout_items = 4\n"
    "vae_config = { ch = 8, ch_mult = [1, 2], norm_groups = 4 }\n"
    "text_encoder_config = { width = 16, layers = 1, heads = 2, mlp_width = 32 }\n"
    "unet = { model_channels = 16, norm_groups = 8, context_dim = 16, attention_levels = [1] }\n"
)
TASK_OPTIONS = {"vae": VAE_OPTIONS, "unet": UNET_OPTIONS, "clip": "resolution = 16\nsynthetic_items = 8\n"}


def write_config(tmp_path: Path, task: str, top: str = "", options: str = "") -> Path:
    """A tiny CPU run of `task` on synthetic data; `top` (key = value lines) replaces or adds keys."""
    values = {"run_dir": f'"{tmp_path / "run"}"', "max_steps": "2", "batch_size": "4", "device": '"cpu"'}
    values["checkpoint_every"] = "1"
    values |= dict(line.split(" = ", 1) for line in top.splitlines() if line)
    path = tmp_path / "config.toml"
    lines = [f"{key} = {value}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n[task_options]\n" + TASK_OPTIONS[task] + options)
    return path


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2, exactly one stderr line, `error: ...`, no traceback; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def image_folder(root: Path, count: int = 4) -> Path:
    for split in ("train", "holdout"):
        (root / split).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / split / f"{i}.png")
            (root / split / f"{i}.txt").write_text(f"image {i}")
    return root


# (id, task, top-level TOML, task_options TOML, CLI overrides, expected part of the error line)
CONFIG_ERRORS = [
    ("unknown key", "vae", "lrate = 1", "", [], "unknown config keys ['lrate']"),
    (
        "wrong type",
        "vae",
        "",
        "",
        ["max_steps=1.5"],
        "command-line override: max_steps = 1.5: expected an integer",
    ),
    ("negative grad clip", "vae", "grad_clip = -1", "", [], "grad_clip = -1.0 is out of range"),
    ("nan lr", "vae", "", "", ["lr=nan"], "lr = nan is out of range: valid is a finite number > 0"),
    ("zero batch", "vae", "", "", ["batch_size=0"], "batch_size = 0 is out of range"),
    ("ema decay 1", "vae", "ema_decay = 1.0", "", [], "ema_decay = 1.0 is out of range"),
    ("negative warmup", "vae", "warmup_steps = -3", "", [], "warmup_steps = -3 is out of range"),
    ("bad override", "vae", "", "", ["lr"], "override 'lr' is not of the form key=value"),
    ("task mismatch", "vae", 'task = "clip"', "", [], "task = 'clip', but 'vae' was asked for"),
    ("unknown option", "vae", "", "colour = 1\n", [], "task_options.colour: unknown vae task option"),
    (
        "option type",
        "vae",
        "",
        "",
        ["task_options.resolution=abc"],
        "resolution = 'abc': expected an integer",
    ),
    ("option range", "unet", "", "caption_dropout = 2.0\n", [], "task_options.caption_dropout = 2.0 is out"),
    ("option choice", "unet", "", 'prediction = "x"\n', [], "task_options.prediction = 'x': expected one of"),
    ("export dtype", "vae", "", 'export_dtype = "float8"\n', [], "task_options.export_dtype = 'float8'"),
    ("model config key", "vae", "", "", ["task_options.vae.depth=3"], "task_options.vae: unknown VAEConfig"),
    (
        "model config range",
        "vae",
        "",
        "",
        ["task_options.vae.ch=0"],
        "task_options.vae.ch = 0 is out of range",
    ),
    ("unbuildable vae", "vae", "", "", ["task_options.vae.norm_groups=3"], "task_options.vae: cannot build"),
    (
        "unbuildable text",
        "unet",
        "",
        "",
        ["task_options.text_encoder_config.heads=3"],
        "heads = 3 does not divide width = 16",
    ),
    ("clip config key", "clip", "", "", ["task_options.clip.colour=1"], "task_options.clip: "),
    ("unet misfit", "unet", "", "", ["task_options.unet.context_dim=7"], "task_options.unet does not fit"),
    ("resolution misfit", "vae", "", "", ["task_options.resolution=17"], "resolution = 17 is not a multiple"),
    ("frozen without init", "vae", "", "frozen_encoder = true\n", [], "frozen_encoder = true fine-tunes"),
    ("cache with flip", "unet", "", "cache = true\nflip = true\n", [], "task_options.cache = true needs"),
    (
        "clip retrieval k",
        "clip",
        "",
        "retrieval_k = [0, 5]\n",
        [],
        "task_options.retrieval_k = [0, 5] is out",
    ),
    (
        "batch above data",
        "vae",
        "batch_size = 16",
        "",
        [],
        "batch_size = 16 is more than the train dataset's 8",
    ),
    (
        "missing dataset",
        "vae",
        "",
        "",
        ["task_options.data=/nonexistent"],
        "/nonexistent/train: train images",
    ),
]


@pytest.mark.parametrize(
    ("task", "top", "options", "overrides", "expected"),
    [case[1:] for case in CONFIG_ERRORS],
    ids=[case[0] for case in CONFIG_ERRORS],
)
def test_config_errors(capsys, tmp_path, task, top, options, overrides, expected):
    line = one_error_line(
        capsys, ["train", task, str(write_config(tmp_path, task, top, options)), *overrides]
    )
    assert expected in line
    if not overrides:
        assert f"{tmp_path / 'config.toml'}" in line or "dataset" in line  # names the file


def test_unreadable_config_files(capsys, tmp_path):
    assert "missing.toml: cannot read the config file" in one_error_line(
        capsys, ["train", "vae", str(tmp_path / "missing.toml")]
    )
    (tmp_path / "bad.toml").write_text("lr = [1\n")
    assert "bad.toml: not valid TOML" in one_error_line(capsys, ["train", "vae", str(tmp_path / "bad.toml")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    config = write_config(tmp_path, "vae")
    assert "device = 'cuda' was asked for" in one_error_line(
        capsys, ["train", "vae", str(config), "device=cuda"]
    )


def test_dataset_errors_name_the_files(capsys, tmp_path):
    data = image_folder(tmp_path / "data")
    (data / "train" / "broken.png").write_bytes(b"not a png")
    (data / "train" / "broken.txt").write_text("broken")
    Image.new("RGB", (16, 16)).save(data / "train" / "uncaptioned.png")
    config = write_config(tmp_path, "vae", options=f'data = "{data}"\n')
    line = one_error_line(capsys, ["train", "vae", str(config)])
    assert "2 of its image files cannot be used" in line and "broken.png: not a recognised image" in line
    assert "uncaptioned.png: no caption" in line and "skip_unreadable = true" in line
    with pytest.warns(UserWarning, match="training without 2 unusable image files .4 used.: .*broken.png"):
        assert main(["train", "vae", str(config), "task_options.skip_unreadable=true"]) == 0

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    config = write_config(tmp_path, "vae", options=f'data = "{empty}"\n')
    assert "empty/train: no usable images" in one_error_line(capsys, ["train", "vae", str(config)])


@pytest.mark.parametrize("workers", [0, 1])
def test_image_that_breaks_during_training_is_named(capsys, tmp_path, workers):
    data = image_folder(tmp_path / "data")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "train" / "cut.png")
    (data / "train" / "cut.txt").write_text("cut")
    whole = (data / "train" / "cut.png").read_bytes()
    (data / "train" / "cut.png").write_bytes(whole[: len(whole) // 2])  # the header still reads
    config = write_config(tmp_path, "vae", f"batch_size = 5\nnum_workers = {workers}", f'data = "{data}"\n')
    line = one_error_line(capsys, ["train", "vae", str(config)])
    assert "cut.png: corrupt or truncated" in line and "skip_unreadable" in line


def test_resume_errors(capsys, tmp_path):
    config = write_config(tmp_path, "vae")
    assert main(["train", "vae", str(config)]) == 0
    line = one_error_line(capsys, ["train", "vae", str(config), "lr=5e-4"])
    assert "cannot resume from" in line and "lr: 0.0001 -> 0.0005" in line and "--restart" in line
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step_*.pt"):
        checkpoint.write_bytes(b"damaged")
    line = one_error_line(capsys, ["train", "vae", str(config)])
    assert "none of the 2 checkpoints" in line and "step_1.pt: " in line and "step_2.pt: " in line
    assert main(["train", "vae", str(config), "--restart"]) == 0
    assert (tmp_path / "run" / "before-restart-1" / "checkpoints" / "step_2.pt").read_bytes() == b"damaged"


def test_divergence(capsys, tmp_path):
    config = write_config(tmp_path, "vae", "max_nan_steps = 1\nmax_steps = 5\nlr = 1e30\ngrad_clip = 0")
    line = one_error_line(capsys, ["train", "vae", str(config)])
    assert line.startswith("error: training diverged: the ") and "likely cause: " in line
