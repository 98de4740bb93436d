"""Hostile-input builders of the reliability suite and the one check every probe makes: exit code 2, exactly
one `error:` line, no traceback (callers also compare `snapshot`s: nothing written or overwritten)."""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from pathlib import Path

from latentforge.cli import main

TQDM = re.compile(r"(\d+|\?)(step|img|it)/s")  # progress bars share stderr with the error line


class Payload:
    """Unpickling this runs `function(*args)`: the probe passes when `marker` was never created."""

    def __init__(self, function, *args) -> None:  # noqa: ANN001
        self.function, self.args = function, args

    def __reduce__(self):  # noqa: ANN204
        return (self.function, self.args)


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process: exit 2, exactly one `error: ` line on stderr, no traceback; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not TQDM.search(line)]
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its SHA-256: compare before and after to prove nothing was written."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels (a decompression-bomb header, a tiny file)."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * min(width, 64))))
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra_chunks + idat + png_chunk(b"IEND", b"")


def png_with_text(key: bytes, text: bytes, chunk: bytes = b"tEXt") -> bytes:
    """A valid 8x8 PNG plus one raw text chunk (bytes as given: invalid UTF-8 stays invalid)."""
    body = key + b"\x00" + (b"\x00\x00\x00\x00" if chunk == b"iTXt" else b"") + text
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + bytes(24) for _ in range(8))))
    return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(chunk, body) + idat + png_chunk(b"IEND", b"")


def png_bilevel(width: int, height: int) -> bytes:
    """A complete, valid 1-bit black PNG of `width` x `height`: a few KB on disk, 3 bytes a pixel as RGB."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
