"""Impossible sizes and counts, hostile prompts and hostile infotexts through `latentforge generate`: each is
refused before any model work with one `error:` line and exit 2, and the output folder is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import one_error_line, png_with_text, snapshot
from PIL import Image

DEEP = 5000  # far beyond prompts/parser.py's nesting limit (100)

# (id, extra generate arguments, expected part of the error line); "{image}" is a valid 32x32 image
REQUESTS = [
    ("size 100000x8", ["--size", "100000x8"], "width 100000"),
    ("size 32x20000", ["--size", "32x20000"], "height 20000"),
    ("size not a multiple of the VAE factor", ["--size", "33x32"], "width 33"),
    ("size negative", ["--size=-32x32"], "width -32"),
    ("batch size 100000", ["--batch-size", "100000"], "batch"),
    ("batch count 100000", ["--batch-count", "100000"], "batch"),
    ("batch size 0", ["--batch-size", "0"], "batch"),
    ("steps 0", ["--steps", "0"], "steps"),
    ("steps 10^9", ["--steps", "1000000000"], "steps"),
    ("hires scale inf", ["--hires-scale", "inf"], "hires"),
    ("hires scale nan", ["--hires-scale", "nan"], "hires"),
    ("hires scale 1000", ["--hires-scale", "1000"], "hires"),
    ("mask blur nan", ["--init-image", "{image}", "--mask", "{image}", "--mask-blur", "nan"], "blur"),
    ("mask blur 1e9", ["--init-image", "{image}", "--mask", "{image}", "--mask-blur", "1e9"], "blur"),
    ("mask blur -1", ["--init-image", "{image}", "--mask", "{image}", "--mask-blur", "-1"], "blur"),
    ("outpaint 100000", ["--init-image", "{image}", "--outpaint", "100000,0,0,0"], "outpaint"),
    ("outpaint negative", ["--init-image", "{image}", "--outpaint=-8,0,0,0"], "outpaint"),
    ("cfg nan", ["--cfg", "nan"], "cfg"),
    ("cfg inf", ["--cfg", "inf"], "cfg"),
    ("strength 2", ["--init-image", "{image}", "--strength", "2"], "strength"),
    ("subseed strength nan", ["--subseed-strength", "nan"], "variation seed strength"),
    ("eta inf", ["--eta", "inf"], "eta"),
    ("schedule bogus", ["--schedule", "bogus"], "bogus"),
    ("sampler bogus", ["--sampler", "bogus"], "bogus"),
    ("init image missing", ["--init-image", "{missing}"], "missing.png"),
    ("init image is a folder", ["--init-image", "{folder}"], "folder"),
]

PROMPTS = [
    ("nesting 5000 round", "(" * DEEP + "a" + ")" * DEEP, "nest"),
    ("nesting 5000 square", "[" * DEEP + "a" + "]" * DEEP, "nest"),
    ("weight 400 digits", "(a:" + "9" * 400 + ")", "weight"),
    ("weight 1.2.3", "(a:1.2.3)", "1.2.3"),
    ("10 MB", "a cat " * (10 * 2**20 // 6), "too long"),
    ("invalid UTF-8 (surrogates from argv)", "a cat \udcff\udcfe", "UTF-8"),
]

INFOTEXTS = [
    (
        "steps 1e9",
        b"a cat\nSteps: 1000000000, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, RNG: CPU",
        "steps",
    ),
    (
        "size 999999x1",
        b"a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 999999x1, RNG: CPU",
        "999999",
    ),
    ("seed -5", b"a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: -5, Size: 32x32, RNG: CPU", "seed"),
    (
        "seed 2^70",
        b"a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1180591620717411303424, RNG: CPU",
        "seed",
    ),
    ("cfg nan", b"a cat\nSteps: 1, Sampler: Euler, CFG scale: nan, Seed: 1, Size: 32x32, RNG: CPU", "cfg"),
    (
        "sampler bogus",
        b"a cat\nSteps: 1, Sampler: Bogus, CFG scale: 7, Seed: 1, Size: 32x32, RNG: CPU",
        "Bogus",
    ),
    (
        "steps not a number",
        b"a cat\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, RNG: CPU",
        "many",
    ),
    ("empty", b"", "parameters"),
    ("10 MB", b"a cat " * (10 * 2**20 // 6) + b"\nSteps: 1, Seed: 1, Size: 32x32, RNG: CPU", "too long"),
    (
        "invalid UTF-8",
        b"a \xff\xfe cat\nSteps: 1, Sampler: Euler, Seed: 1, Size: 32x32, RNG: CPU",
        "no A1111",
    ),
]


def text_id(text: bytes) -> str:
    return next(case[0] for case in INFOTEXTS if case[1] == text)


@pytest.fixture
def setup(tiny_checkpoint, tmp_path) -> dict[str, Path]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(b"an image from before")
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "image.png")
    (tmp_path / "folder").mkdir()
    return {"model": tiny_checkpoint, "out": out, "root": tmp_path}


def _generate(setup: dict[str, Path], prompt: str, *extra: str) -> list[str]:
    names = {"image": "image.png", "missing": "missing.png", "folder": "folder"}
    extra_args = [str(setup["root"] / names[a[1:-1]]) if a[1:-1] in names else a for a in extra]
    base = ["generate", prompt, "--model", str(setup["model"]), "--steps", "1", "--size", "32x32"]
    return [*base, "--out", str(setup["out"]), *extra_args]


def _check(capsys, setup: dict[str, Path], argv: list[str], expected: str) -> None:
    before = snapshot(setup["out"])
    line = one_error_line(capsys, argv)
    assert expected.lower() in line.lower(), line
    assert snapshot(setup["out"]) == before


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in REQUESTS], ids=[c[0] for c in REQUESTS])
def test_impossible_request(extra, expected, setup, capsys):
    _check(capsys, setup, _generate(setup, "a cat", *extra), expected)


@pytest.mark.parametrize(("prompt", "expected"), [c[1:] for c in PROMPTS], ids=[c[0] for c in PROMPTS])
def test_hostile_prompt(prompt, expected, setup, capsys):
    _check(capsys, setup, _generate(setup, prompt), expected)
    _check(capsys, setup, _generate(setup, "a cat", "--negative", prompt), expected)


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in INFOTEXTS], ids=[c[0] for c in INFOTEXTS])
@pytest.mark.parametrize("chunk", [b"tEXt", b"iTXt"])
def test_hostile_infotext(text, expected, chunk, setup, capsys):
    if chunk == b"tEXt" and "UTF-8" in text_id(text):
        pytest.skip("tEXt is Latin-1 (PNG spec 11.3.4.3): every byte string is a valid text there")
    source = setup["root"] / "source.png"
    source.write_bytes(png_with_text(b"parameters", text, chunk))
    argv = ["generate", "--model", str(setup["model"]), "--from-png", str(source), "--out", str(setup["out"])]
    _check(capsys, setup, argv, expected)
