"""Unwritable outputs: `--out` that is a file, a read-only folder, a path under /proc; and a folder with
earlier images, which must survive a new run untouched. Errors come before any model work."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hostile import one_error_line, snapshot

from latentforge.cli import main


def _generate(model: Path, out: str, *extra: str) -> list[str]:
    return ["generate", "x", "--model", str(model), "--steps", "1", "--size", "32x32", "--out", out, *extra]


def test_out_is_a_file(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    line = one_error_line(capsys, _generate(tiny_checkpoint, str(tmp_path / "taken")))
    assert "taken" in line and (tmp_path / "taken").read_text() == "mine"


def test_out_under_proc(tiny_checkpoint, capsys):
    if not Path("/proc/self").exists():
        pytest.skip("no /proc on this system")
    assert "/proc/self/latentforge-out" in one_error_line(
        capsys, _generate(tiny_checkpoint, "/proc/self/latentforge-out")
    )


def test_out_read_only(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the /proc case covers unwritable)")
        assert "read-only" in one_error_line(capsys, _generate(tiny_checkpoint, str(folder)))
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs filled to the last byte (mounting needs root; skipped otherwise)."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip() or made.returncode}")
    try:
        with contextlib.suppress(OSError), open(mount / "filler", "wb", buffering=0) as f:  # noqa: PTH123
            while True:
                f.write(bytes(4096))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_out_on_full_disk(tiny_checkpoint, full_disk, capsys):
    """The image is written to a temporary name and renamed: a full disk leaves no partial file behind."""
    out = full_disk / "out"
    line = one_error_line(capsys, _generate(tiny_checkpoint, str(out)))
    assert "No space left on device" in line and str(out) in line
    assert sorted(p.name for p in full_disk.rglob("*")) == ["filler", "out"]  # nothing but the empty folder


def test_earlier_images_are_never_overwritten(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("00000-0.png", "00001-0.png", "00003-0.png"):  # a gap, as after the user deleted one
        (out / name).write_bytes(b"an earlier image " + name.encode())
    before = snapshot(out)
    assert main(_generate(tiny_checkpoint, str(out), "--seed", "0")) == 0
    after = snapshot(out)
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 1
