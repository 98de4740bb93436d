"""Safetensors headers are validated completely before any tensor is read (issue 19): a matrix of
malformed headers, each a one-line CorruptCheckpointError naming the tensor and the fault, with bounded
memory; and a seeded, time-bounded fuzz of the header parser that finds no other exception."""

import json
import random
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from latentforge.checkpoints.errors import CheckpointError, CorruptCheckpointError
from latentforge.checkpoints.reading import parse_safetensors_header, read_state_dict

MiB = 1 << 20


def _file(path, header: dict | bytes, data: bytes, header_len: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _f32(begin: int, end: int, shape: list | None = None, dtype: str = "F32") -> dict:
    return {
        "dtype": dtype,
        "shape": [(end - begin) // 4] if shape is None else shape,
        "data_offsets": [begin, end],
    }


# name -> (header, data length, expected message part); every header claims to describe the data
MATRIX = {
    "overlap": ({"a": _f32(0, 16), "b": _f32(8, 24)}, 24, "tensor 'b' overlaps the tensor before it"),
    "gap": ({"a": _f32(0, 16), "b": _f32(20, 36)}, 36, "tensor 'b' leaves a gap before it"),
    "out of bounds": (
        {"a": _f32(0, 16), "b": _f32(16, 64)},
        32,
        "tensor 'b': data_offsets [16, 64] reach past",
    ),
    "trailing junk": ({"a": _f32(0, 16)}, 20, "4 bytes after the last tensor's data"),
    "missing data": ({"a": _f32(4, 20)}, 20, "tensor 'a' leaves a gap before it"),
    "wrong length": ({"a": _f32(0, 16, shape=[3])}, 16, "tensor 'a': shape [3] of F32 needs 12 bytes"),
    "huge shape": (
        {"a": _f32(0, 16, shape=[2**62, 2**62, 2**62])},
        16,
        "tensor 'a': shape [4611686018427387904",
    ),
    "bad dtype": ({"a": _f32(0, 16, dtype="F128")}, 16, "tensor 'a': unknown dtype 'F128'"),
    "negative offsets": (
        {"a": _f32(-16, 0, shape=[4])},
        16,
        "tensor 'a': data_offsets [-16, 0] are negative",
    ),
    "reversed offsets": (
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
        16,
        "are negative or reversed",
    ),
    "negative size": (
        {"a": _f32(0, 16, shape=[-4, -1])},
        16,
        "tensor 'a': shape [-4, -1] has a size that is not",
    ),
    "float size": ({"a": _f32(0, 16, shape=[4.0])}, 16, "tensor 'a': shape [4.0] has a size that is not"),
    "entry not an object": ({"a": [0, 16]}, 16, "tensor 'a': entry must be an object"),
    "extra field": (
        {"a": {**_f32(0, 16), "offset": 0}},
        16,
        "tensor 'a': entry must be an object with exactly",
    ),
    "string offsets": (
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}},
        16,
        "two integers",
    ),
    "deep rank": (
        {"a": _f32(0, 16, shape=[1] * 65 + [4])},
        16,
        "tensor 'a': shape must be a list of at most 64",
    ),
    "bad metadata": (
        {"__metadata__": {"k": 1}, "a": _f32(0, 16)},
        16,
        "__metadata__ must map names to strings",
    ),
    "duplicate name": (
        b'{"a":' + json.dumps(_f32(0, 16)).encode() + b',"a":' + json.dumps(_f32(0, 16)).encode() + b"}",
        16,
        "names 'a' twice",
    ),
    "deep nesting": (b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", 16, "unreadable safetensors header"),
    "not json": (b"{this is not json}", 16, "unreadable safetensors header"),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_malformed_header_is_one_clear_line(tmp_path, case):
    header, data_len, expected = MATRIX[case]
    path = _file(tmp_path / "bad.safetensors", header, bytes(data_len))
    with pytest.raises(CorruptCheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert expected in message, message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("header_len", "expected"), [(1 << 40, "safetensors header of 1099511627776 bytes"), (10, "unreadable")]
)
def test_wrong_header_length(tmp_path, header_len, expected):
    path = _file(tmp_path / "bad.safetensors", {"a": _f32(0, 16)}, bytes(16), header_len=header_len)
    with pytest.raises(CorruptCheckpointError, match=expected):
        read_state_dict(path)


def test_header_that_is_not_an_object():
    with pytest.raises(CorruptCheckpointError, match="header is a JSON list, not an object"):
        parse_safetensors_header("m.safetensors", b"[1, 2]", 0)


def test_valid_files_of_every_kind_still_load(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(),
        "empty": torch.zeros(0, 7),
        "empty2": torch.zeros(0),
        "bool": torch.tensor([True, False]),
        "u8": torch.arange(7, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"k": "v"})
    loaded, metadata = read_state_dict(tmp_path / "ok.safetensors")
    assert metadata == {"k": "v"} and sorted(loaded) == sorted(tensors)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())


def test_a_1_mib_hostile_file_allocates_little(tmp_path):
    """Issue 19: 2000 tensors all claiming the same 1 MiB made the reader allocate 2.2 GB. Measured in a
    child process (torch's allocations are invisible to tracemalloc): peak RSS growth while reading
    every hostile file of the matrix plus this one."""
    hostile = tmp_path / "overlap-1mib.safetensors"
    header = {f"t{i}": _f32(0, MiB) for i in range(2000)}
    _file(hostile, header, bytes(MiB))
    paths = [str(hostile)]
    for i, (header, data_len, _) in enumerate(MATRIX.values()):
        paths.append(str(_file(tmp_path / f"m{i}.safetensors", header, bytes(data_len))))
    script = textwrap.dedent(f"""
        import resource
        from latentforge.checkpoints.errors import CorruptCheckpointError
        from latentforge.checkpoints.reading import read_state_dict
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for path in {paths!r}:
            try:
                read_state_dict(path)
            except CorruptCheckpointError:
                pass
            else:
                raise SystemExit("loaded " + path)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # KiB on Linux
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mib = int(done.stdout) / 1024
    assert growth_mib < 48, f"peak RSS grew by {growth_mib:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# Fuzz: mutations of valid headers and random JSON, seeded and bounded in time
# --------------------------------------------------------------------------------------------------


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([0, 1, -1, 4, 16, 2**31, 2**63, -(2**63), 10**30, rng.randrange(-100, 100)])
    if kind == 1:
        return rng.choice([0.5, -0.0, 1e308, float("inf")]) if rng.random() < 0.5 else 4.0
    if kind == 2:
        return rng.choice(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F128", "", "f32", "\u00e9", "F8_E4M3"])
    if kind == 3:
        return None
    if kind == 4:
        return rng.random() < 0.5
    if kind == 5:
        return [rng.randrange(-2, 40) for _ in range(rng.randrange(0, 5))]
    if kind == 6:
        return [rng.randrange(0, 80), rng.randrange(0, 80)]
    if kind in (7, 8):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        rng.choice(["dtype", "shape", "data_offsets", "x"]): _random_json(rng, depth + 1) for _ in range(3)
    }


def _valid_header(rng: random.Random) -> tuple[dict, int]:
    header, position = {}, 0
    for i in range(rng.randrange(0, 5)):
        dtype, size = rng.choice([("F32", 4), ("F16", 2), ("I64", 8), ("U8", 1), ("BOOL", 1)])
        shape = [rng.randrange(0, 4) for _ in range(rng.randrange(0, 3))]
        numel = 1
        for d in shape:
            numel *= d
        header[f"t{i}"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [position, position + numel * size],
        }
        position += numel * size
    if rng.random() < 0.3:
        header["__metadata__"] = {"format": "pt"}
    return header, position


def _mutate(rng: random.Random, header: dict) -> dict:
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randrange(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and names:
            entry = header[rng.choice(names)]
            if isinstance(entry, dict):
                entry[rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
        elif choice == 1 and names:
            header[rng.choice(names)] = _random_json(rng)
        elif choice == 2:
            header[rng.choice(["__metadata__", "z", ""])] = _random_json(rng)
        elif names:
            entry = header[rng.choice(names)]
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if isinstance(offsets, list) and offsets and isinstance(offsets[0], int):
                offsets[0] += rng.choice([-9, -1, 1, 3])
    return header


def test_fuzzed_headers_raise_only_checkpoint_errors():
    rng = random.Random(20261206)
    deadline = time.monotonic() + 3.0
    counts = {"valid": 0, "rejected": 0}
    while time.monotonic() < deadline:
        header, data_len = _valid_header(rng)
        roll = rng.random()
        if roll < 0.6:
            raw = json.dumps(_mutate(rng, header)).encode()
        elif roll < 0.8:
            raw = json.dumps(_random_json(rng)).encode()
        else:  # byte-level damage of a valid header
            raw = bytearray(json.dumps(header).encode())
            for _ in range(rng.randrange(1, 4)):
                if raw:
                    raw[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(raw[: rng.randrange(len(raw) + 1)]) if rng.random() < 0.3 else bytes(raw)
        data_len = max(0, data_len + rng.choice([0, 0, 0, -1, 1, 8]))
        try:
            parse_safetensors_header("fuzz.safetensors", raw, data_len)
            counts["valid"] += 1
        except CheckpointError as e:
            assert "\n" not in str(e)
            counts["rejected"] += 1
    assert counts["valid"] > 50 and counts["rejected"] > 500, counts  # both outcomes were exercised


def test_fuzzed_files_raise_only_checkpoint_errors(tmp_path):
    """The same through the whole reader: random header lengths, truncations and appended bytes."""
    rng = random.Random(7)
    path = tmp_path / "fuzz.safetensors"
    deadline = time.monotonic() + 1.5
    runs = 0
    while time.monotonic() < deadline:
        header, data_len = _valid_header(rng)
        raw = json.dumps(_mutate(rng, header) if rng.random() < 0.5 else header).encode()
        data = bytes(rng.randrange(256) for _ in range(max(0, data_len + rng.choice([0, -2, 3]))))
        header_len = len(raw) + rng.choice([0, 0, -1, 1, 1000])
        _file(path, raw, data, header_len=max(0, header_len))
        try:
            read_state_dict(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
        runs += 1
    assert runs > 100
