"""Generation split over processes with torchrun makes the files one process makes, byte for byte.

Two gloo ranks on the CPU (one thread each, as the single process under pytest) against one process:
`latentforge generate --prompts FILE --seeds ...` (images and grid) and `latentforge eval`'s
generation (images, then metrics computed once by rank 0). Batches of 2 over 6 images make 3 batches,
so the ranks get unequal parts (2 and 1) and one batch mixes two prompts.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge import distributed
from latentforge.cli import main
from latentforge.errors import LatentforgeError, OutputError
from latentforge.pipelines.sharding import Shard, on_main

PROMPTS = "a red circle\na blue square\n"
SPEC = ["--seeds", "3-5", "--steps", "2", "--size", "32x32", "--batch-size", "2"]


def torchrun(*argv: object) -> subprocess.CompletedProcess:
    """`latentforge ARGV` in two processes on (at most) two cores: one intra-op thread per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cores = sorted(os.sched_getaffinity(0))[:2]
    return subprocess.run(
        [*command, "-m", "latentforge", *map(str, argv)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
        capture_output=True,
        text=True,
        timeout=600,
    )


def files(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern)) if p.is_file()}


def test_two_ranks_write_the_files_one_process_writes(tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    args = ["generate", "--prompts", prompts, *SPEC, "--model", tiny_checkpoint]
    for run in ("single", "ranks"):  # a file from an earlier run: numbering continues after it
        (tmp_path / run).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / run / "00007-1.png")
    assert main([*map(str, args), "--out", str(tmp_path / "single")]) == 0
    result = torchrun(*args, "--out", tmp_path / "ranks")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    single, ranks = files(tmp_path / "single"), files(tmp_path / "ranks")
    names = ["00007-1.png", *(f"{8 + i:05d}-{3 + i % 3}.png" for i in range(6)), "grid-00000.png"]
    assert sorted(single) == sorted(names)
    assert sorted(ranks) == sorted(single)
    for name in single:
        assert ranks[name] == single[name], name
    # each rank printed the files it wrote, none twice (the ranks' lines may interleave in one pipe)
    printed = re.findall(r"(?:grid-)?\d{5}(?:-\d+)?\.png", result.stdout)
    assert sorted(printed) == sorted(names[1:])


def test_a_random_seed_is_drawn_once_for_all_ranks(tmp_path, tiny_checkpoint):
    """Seed -1 with a batch count: image i has seed + i, whichever rank makes it."""
    args = ["generate", "a cat", "--batch-count", "3", "--steps", "1", "--size", "32x32", "--no-grid"]
    result = torchrun(*args, "--model", tiny_checkpoint, "--out", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    seeds = [int(name.split("-")[1].split(".")[0]) for name in names]
    assert [name[:5] for name in names] == ["00000", "00001", "00002"]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]


def _reference(folder: Path, count: int = 8) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"{i:02d}.png")
    return folder


def test_eval_generates_on_two_ranks_and_measures_once(tmp_path, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    reference = _reference(tmp_path / "reference")
    args = [
        "eval", "--model", tiny_checkpoint, "--prompts", prompts, *SPEC, "--reference", reference,
        "--features", "random", "--metrics", "fid,kid,precision_recall", "--no-cache",
    ]  # fmt: skip
    assert main([*map(str, args), "--out", str(tmp_path / "single")]) == 0
    result = torchrun(*args, "--out", tmp_path / "ranks")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    single, ranks = (files(tmp_path / run / "images") for run in ("single", "ranks"))
    assert len(single) == 12 and sorted(ranks) == sorted(single)  # 6 PNGs and their captions
    assert all(ranks[name] == single[name] for name in single)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("single", "ranks")]
    assert set(metrics[0]["values"]) >= {"fid", "kid", "precision", "recall"}
    assert metrics[1]["values"] == metrics[0]["values"]
    assert metrics[1]["counts"] == metrics[0]["counts"]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone evaluated and reported


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("total", [0, 1, 3, 7, 10])
def test_shards_cover_the_batches_once_in_order(total, count):
    parts = [Shard(rank, count).batches(total) for rank in range(count)]
    assert [i for part in parts for i in part] == list(range(total))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    images = [i for rank in range(count) for i in Shard(rank, count).images(total * 3 - 1, 3)]
    assert images == list(range(max(total * 3 - 1, 0)))


def test_cpu_thread_share_gives_each_process_its_cores():
    cores = len(os.sched_getaffinity(0))
    assert distributed.cpu_thread_share({}) == cores
    # torchrun's own OMP_NUM_THREADS=1 for several processes per machine is not a choice of the user's
    two = {"LOCAL_WORLD_SIZE": "2"}
    assert distributed.cpu_thread_share({**two, "OMP_NUM_THREADS": "1"}) == max(1, cores // 2)
    assert distributed.cpu_thread_share({**two, "OMP_NUM_THREADS": "3"}) is None
    assert distributed.cpu_thread_share({"OMP_NUM_THREADS": "1"}) is None


def test_on_main_passes_results_and_errors_through_in_one_process():
    assert on_main(lambda: 41 + 1) == 42

    def refuse() -> None:
        raise OutputError("out holds images")

    with pytest.raises(LatentforgeError, match="out holds images"):
        on_main(refuse)


def test_generate_flag_errors(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    assert main(["generate", "a cat", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "--prompts FILE gives the prompts" in capsys.readouterr().err
    assert main(["generate", "a cat", "--seeds", "0-3", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds goes with --prompts FILE" in capsys.readouterr().err
