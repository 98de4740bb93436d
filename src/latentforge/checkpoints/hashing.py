"""File hashes as A1111 shows them ("Model hash": the first 10 hex digits of the SHA-256)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def a1111_short_hash(path: str | Path) -> str:
    return sha256_file(path)[:10]
