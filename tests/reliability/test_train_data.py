"""Broken dataset files for `latentforge train` beyond tests/unit/test_train_cli_errors.py (which covers a
non-image, a truncated image, a missing caption and an empty folder): a decompression-bomb header, a
zero-byte image and a caption that is not UTF-8 are each named in one `error:` line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import one_error_line, png_declaring
from PIL import Image

OPTIONS = "resolution = 16\nsynthetic_items = 8\nvae = { ch = 8, ch_mult = [1, 2], norm_groups = 4 }\n"


def _dataset(root: Path) -> Path:
    for split in ("train", "holdout"):
        (root / split).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / split / f"{i}.png")
            (root / split / f"{i}.txt").write_text(f"image {i}")
    return root


BROKEN = {
    "bomb header": ("bomb.png", lambda: png_declaring(100_000, 100_000), b"a caption"),
    "zero-byte image": ("empty.png", lambda: b"", b"a caption"),
    "caption not UTF-8": ("latin.png", None, b"caf\xe9 \xff"),
}
KNOWN: dict[str, str] = {}  # found by this suite and not fixed yet (none now; see docs/reliability.md)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_dataset_file_is_named(kind, tmp_path, capsys, request):
    if kind in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[kind], strict=True))
    data = _dataset(tmp_path / "data")
    name, image, caption = BROKEN[kind]
    if image is None:
        Image.new("RGB", (16, 16)).save(data / "train" / name)
    else:
        (data / "train" / name).write_bytes(image())
    (data / "train" / name).with_suffix(".txt").write_bytes(caption)
    config = tmp_path / "config.toml"
    config.write_text(
        f'run_dir = "{tmp_path / "run"}"\nmax_steps = 1\nbatch_size = 4\ndevice = "cpu"\n'
        f'[task_options]\n{OPTIONS}data = "{data}"\n'
    )
    task = "clip" if "caption" in kind else "vae"  # the VAE never reads captions
    if task == "clip":
        config.write_text(config.read_text().replace("vae = {", "# vae = {"))
    line = one_error_line(capsys, ["train", task, str(config)])
    assert name.split(".")[0] in line, line
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
