"""What low-memory mode costs per U-Net call: the same checkpoint loaded normally and with `low_memory=True`
in one process, U-Net calls interleaved (CFG batch 2, one thread, process CPU time), so machine load
disturbs all three alike. "low-memory" drops every block's pages before each call (as between steps: the
block that ran last is the only one resident) so each call faults them back from the page cache; "no
release" is the same mapping with releasing switched off (the cost of file-backed weights and the hooks
alone).

    OMP_NUM_THREADS=1 python benchmarks/low_memory_step.py --size 512 --repeats 3

Reads the SD1.5-size random fp16 file `benchmarks/memory.py` writes (run that once first).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path(tempfile.gettempdir()) / "latentforge-bench" / "sd15-random-fp16.safetensors",
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from latentforge.model import load

    torch.set_num_threads(1)
    normal = load(args.checkpoint, dtype=torch.bfloat16, compute_hash=False)
    low = load(args.checkpoint, dtype=torch.bfloat16, compute_hash=False, low_memory=True)
    residency = low.residency
    assert residency is not None
    side = args.size // 8
    x = torch.randn(2, 4, side, side, dtype=torch.bfloat16)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, 768, dtype=torch.bfloat16)

    def call(model) -> float:  # noqa: ANN001
        with torch.inference_mode():
            start = time.process_time()
            model.unet(x, t, context)
            return time.process_time() - start

    def without_release(*groups: str) -> None:
        return None

    times: dict[str, list[float]] = {"normal": [], "low-memory": [], "low-memory, no release": []}
    for _ in range(args.repeats):
        times["normal"].append(call(normal))
        residency.use("text")  # every U-Net block dropped, as after a step
        times["low-memory"].append(call(low))
        release = residency.release
        residency.release = without_release  # type: ignore[method-assign]
        times["low-memory, no release"].append(call(low))
        residency.release = release  # type: ignore[method-assign]
    base = statistics.median(times["normal"])
    print(f"\ntorch {torch.__version__}, {args.size} px, bf16, batch 2, {args.repeats} repeats\n")
    print("| weights | median CPU s | runs | / normal |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median, runs = statistics.median(values), " ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {median:.2f} | {runs} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
