"""Malformed model files through every command that loads one: one `error:` line naming the file, exit 2,
nothing written. The reader's own unit tests (tests/unit/test_checkpoint_reading.py,
test_safetensors_header.py with its header fuzz) cover the parsing; this covers the command line."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import one_error_line, snapshot


def _zip_not_torch(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "a zip archive, not a torch checkpoint")


def _ckpt_junk_appended(path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, buffer)
    path.write_bytes(buffer.getvalue() + b"\x00junk" * 100)


def _diffusers(path: Path, config: str) -> None:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (path / part).mkdir()
        (path / part / "config.json").write_bytes(config.encode("utf-8", "surrogateescape"))
        (path / part / "scheduler_config.json").write_bytes(config.encode("utf-8", "surrogateescape"))


BAD_UTF8 = '{"a": "\udcff"}'  # written with surrogateescape: the byte 0xff

# name -> (file name, writer given the good model's bytes)
FILES: dict[str, tuple[str, Callable[[Path, bytes], None]]] = {
    "empty": ("empty.safetensors", lambda p, good: p.write_bytes(b"")),
    "truncated": ("truncated.safetensors", lambda p, good: p.write_bytes(good[: len(good) // 2])),
    "header only": (
        "header.safetensors",
        lambda p, good: p.write_bytes(good[: 8 + int.from_bytes(good[:8], "little")]),
    ),
    "html page": (
        "page.safetensors",
        lambda p, good: p.write_bytes(b"<!DOCTYPE html><html><body>404</body></html>"),
    ),
    "git-lfs pointer": (
        "lfs.safetensors",
        lambda p, good: p.write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 2132\n"
        ),
    ),
    "zip, not torch": ("archive.ckpt", lambda p, good: _zip_not_torch(p)),
    "junk appended": ("junk.safetensors", lambda p, good: p.write_bytes(good + b"\x00" * 4096)),
    "ckpt, junk appended": ("junk.ckpt", lambda p, good: _ckpt_junk_appended(p)),
    "huge header length": (
        "huge.safetensors",
        lambda p, good: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"),
    ),
    "empty ckpt": ("empty.ckpt", lambda p, good: p.write_bytes(b"")),
    "directory": ("folder.safetensors", lambda p, good: p.mkdir()),
    "diffusers, config.json not JSON": ("diffusers", lambda p, good: _diffusers(p, "{ this is not json")),
    "diffusers, config.json a list": ("diffusers", lambda p, good: _diffusers(p, "[1, 2]")),
    "diffusers, config.json empty object": ("diffusers", lambda p, good: _diffusers(p, "{}")),
    "diffusers, config.json invalid UTF-8": ("diffusers", lambda p, good: _diffusers(p, BAD_UTF8)),
}

COMMANDS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "generate --model": lambda bad, good, out: [
        "generate", "x", "--model", str(bad), "--steps", "1", "--size", "32x32", "--out", str(out)
    ],
    "generate --vae": lambda bad, good, out: [
        "generate", "x", "--model", str(good), "--vae", str(bad), "--steps", "1", "--size", "32x32",
        "--out", str(out),
    ],
    "info": lambda bad, good, out: ["info", str(bad)],
    "convert": lambda bad, good, out: ["convert", str(bad), str(out / "converted.safetensors")],
}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(FILES))
def test_malformed_model_file(kind, command, tiny_checkpoint, tmp_path, capsys):
    name, write = FILES[kind]
    bad = tmp_path / name
    write(bad, tiny_checkpoint.read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"an image from before")
    before = snapshot(out)
    line = one_error_line(capsys, COMMANDS[command](bad, tiny_checkpoint, out))
    assert name in line, line  # names the file
    assert snapshot(out) == before
