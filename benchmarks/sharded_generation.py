"""Batch generation in one process with T threads against P torchrun processes of T / P threads each.

    nice -n 5 python benchmarks/sharded_generation.py --rounds 3 --layouts 1x2,1x1,2x1

Runs `latentforge generate --prompts FILE --seeds 0-3` (2 prompts x 4 seeds = 8 images of the embedded
model, 64 px, its default 20 steps, batch 1) end to end as a user would: the command's wall time
includes starting Python, importing torch and loading the model in every process. Rounds are
interleaved; medians are printed. Also says whether the layouts wrote the same files as the first one,
byte for byte, and the largest pixel difference (with other thread counts a kernel may sum in another
order, so the bytes need not be the same).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = "red apple, google style\na smiling yellow face with sunglasses\n"


def _run(command: list[str], threads: int | None) -> tuple[float, float]:
    """Wall and CPU seconds (children's user + system) of one command."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _compare(first: list[Path], other: list[Path]) -> tuple[int, int]:
    """(files byte-identical, max abs pixel difference 0-255) of two runs' images and grid."""
    import numpy as np
    from PIL import Image

    same, worst = 0, 0
    for a, b in zip(first, other, strict=True):
        same += a.name == b.name and a.read_bytes() == b.read_bytes()
        pixels = [np.asarray(Image.open(p).convert("RGB"), np.int16) for p in (a, b)]
        worst = max(worst, int(np.abs(pixels[0] - pixels[1]).max()))
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--layouts",
        default="1x2,2x1",
        help="PxT, comma-separated: P processes (torchrun when P > 1) of T threads; Px1 with P > 1 leaves "
        "OMP_NUM_THREADS unset, i.e. latentforge's share, cores // P (1 on a 2-core machine)",
    )
    parser.add_argument("--seeds", default="0-3")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text(PROMPTS)
        generate = ["-m", "latentforge", "generate", "--prompts", str(prompts), "--seeds", args.seeds]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        layouts: dict[str, tuple[list[str], int | None]] = {}
        for layout in args.layouts.split(","):
            processes, threads = (int(n) for n in layout.lower().split("x"))
            if processes == 1:
                layouts[layout] = ([sys.executable, *generate], threads)
            else:
                layouts[layout] = ([*torchrun, str(processes), *generate], None if threads == 1 else threads)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
        for r in range(args.rounds):
            for name, (command, threads) in layouts.items():
                out = Path(tmp) / f"{r}-{name}"
                times[name].append(_run([*command, "--out", str(out)], threads))
                print(f"round {r}: {name}: wall {times[name][-1][0]:.1f} s, CPU {times[name][-1][1]:.1f} s")
        outs = {name: sorted((Path(tmp) / f"0-{name}").glob("*.png")) for name in layouts}
        first = next(iter(layouts))
        compared = {name: _compare(outs[first], outs[name]) for name in layouts}
    count = len(outs[first]) - 1  # without the grid
    header = f"processes x threads | wall median s | CPU median s | wall s per image | same files as {first}"
    print(f"\n| {header} | max pixel diff |\n|---|---|---|---|---|---|")
    for name, rows in times.items():
        wall, cpu = statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows)
        same, worst = compared[name]
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / count:.2f} | {same} of {count + 1} | {worst} |")


if __name__ == "__main__":
    main()
