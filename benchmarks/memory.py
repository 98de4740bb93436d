"""Where the peak RSS of a txt2img run happens: load, text encoding, sampling, decode, phase by phase.

One process, one SD1.5-size model (a random-weight checkpoint file, written once, read by
`latentforge.load` as a user's file is; or `--source random`: built on `meta` and filled in place, what
benchmarks/txt2img.py does), one generation. At each phase boundary the peak RSS since the previous one
(VmHWM) and the RSS now are read and the peak is reset (`/proc/self/clear_refs`), so each phase's row is
its own peak. Phases: imports, load, [int8], warm-up (a 64 px run), text encoder, sampling (all U-Net
calls), decode, rest (tokenizer, sampler, image conversion).

    OMP_NUM_THREADS=1 python benchmarks/memory.py --file-dtype fp16 --dtype bf16 --size 512 --steps 2
    OMP_NUM_THREADS=1 python benchmarks/memory.py --file-dtype fp16 --dtype bf16 --int8 --size 512
    OMP_NUM_THREADS=1 python benchmarks/memory.py --file-dtype fp16 --dtype bf16 --size 1024 --steps 1
    OMP_NUM_THREADS=1 python benchmarks/memory.py --file-dtype fp16 --dtype bf16 --size 512 --steps 1 \
        --banded-above 0  # the banded VAE decode at every size (default: above 768x768)
    OMP_NUM_THREADS=1 python benchmarks/memory.py --file-dtype fp16 --dtype bf16 --size 512 --low-memory

`--low-memory` loads as `latentforge generate --low-memory` (models/residency.py). Per phase the table also
gives the page faults (minor: from the page cache, major: from disk) and, after the phase, the RSS split into
file-backed (the parked weights' mapped pages) and anonymous memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def faults() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


class Phases:
    """Peak RSS per phase: `mark(name)` closes the phase that ran since the previous mark."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, list[float]]] = []
        self.start = time.perf_counter(), time.process_time(), *faults()

    def mark(self, name: str) -> None:
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        minor, major = (now - before for now, before in zip(faults(), self.start[2:], strict=True))
        now = [status_mib(f) for f in ("VmHWM", "VmRSS", "RssFile", "RssAnon")]
        self.rows.append((name, [*now, wall, cpu, minor, major]))
        Path("/proc/self/clear_refs").write_text("5")  # peak := current RSS
        self.start = time.perf_counter(), time.process_time(), *faults()


def hook(module, phases: Phases, name: str) -> None:  # noqa: ANN001
    """The phase before `module` runs ends as "before <name>", its forward as `name`."""
    module.register_forward_pre_hook(lambda m, i: phases.mark(f"before {name}"))
    module.register_forward_hook(lambda m, i, o: phases.mark(name))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=["file", "random"], default="file")
    parser.add_argument("--file-dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=Path(tempfile.gettempdir()) / "latentforge-bench"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--int8", action="store_true", help="int8 weights, as `latentforge generate --int8`")
    parser.add_argument("--low-memory", action="store_true", help="as `latentforge generate --low-memory`")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiled-vae", action="store_true")
    parser.add_argument(
        "--banded-above", type=int, help="banded decode above this many pixels (default: the library's)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint file and stop")
    args = parser.parse_args()

    phases = Phases()
    import torch

    from latentforge.model import load
    from latentforge.models.families import SD1
    from latentforge.pipelines.request import GenerationRequest
    from latentforge.pipelines.runner import run

    dtype = getattr(torch, DTYPES[args.dtype])
    path = args.checkpoint_dir / f"sd15-random-{args.file_dtype}.safetensors"
    if args.source == "file" and not path.is_file():
        from full_size_roundtrip import write_random_checkpoint

        write_random_checkpoint(path, SD1, getattr(torch, DTYPES[args.file_dtype]))
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")
        if args.write_only:
            return
        phases = Phases()
    torch.set_num_threads(args.threads)
    phases.mark("imports")
    if args.source == "file":
        options = {"int8": True} if args.int8 else {}
        model = load(path, dtype=dtype, compute_hash=False, **options, low_memory=args.low_memory)
    else:
        if args.low_memory:
            parser.error("--low-memory loads a file: drop --source random")
        from txt2img import build_ours

        model = build_ours(dtype)
        if args.int8:
            from latentforge.models.quantize import quantize_int8

            quantize_int8(model.unet)
    phases.mark("load" + (" (int8)" if args.int8 else ""))
    run(model, GenerationRequest(prompt="warm-up", steps=1, width=64, height=64), progress=False)
    phases.mark("warm-up (64 px, 1 step)")
    hook(model.text_encoder, phases, "text encoder")
    calls: list[int] = []

    def count(module, inputs):  # noqa: ANN001, ANN202
        if not calls:
            phases.mark("between")  # after the text encoder, before the first U-Net call
        calls.append(1)

    model.unet.register_forward_pre_hook(count)
    decode = model.vae.decode

    def marked_decode(z):  # noqa: ANN001, ANN202
        phases.mark("sampling")  # every U-Net call
        out = decode(z)
        phases.mark("decode")
        return out

    model.vae.decode = marked_decode
    from latentforge.pipelines import images

    banded = images.decode_banded

    def marked_banded(vae, z):  # noqa: ANN001, ANN202
        phases.mark("sampling")
        out = banded(vae, z)
        phases.mark("decode")
        return out

    images.decode_banded = marked_banded
    if args.banded_above is not None:
        images.BANDED_DECODE_PIXELS = args.banded_above
    request = GenerationRequest(
        prompt="a photograph of an astronaut riding a horse", negative_prompt="blurry", steps=args.steps,
        sampler="DPM++ 2M", schedule="Karras", cfg_scale=7.0, seed=1, width=args.size, height=args.size,
        tiled_vae=True if args.tiled_vae else None,
    )  # fmt: skip
    run(model, request, progress=False)
    phases.mark("rest")
    print(
        f"\ntorch {torch.__version__}, low memory {args.low_memory}, "
        f"source {args.source} ({args.file_dtype} file), {args.dtype}{' + int8' if args.int8 else ''}, "
        f"{args.size}x{args.size}, {args.steps} steps, {len(calls)} U-Net calls, tiled VAE {args.tiled_vae}, "
        f"banded decode above {images.BANDED_DECODE_PIXELS} px\n"
    )
    merged: dict[str, list[float]] = {}  # the text encoder runs once per prompt: max/last/sum over calls
    for name, (peak, rss, file, anon, wall, cpu, minor, major) in phases.rows:
        old = merged.get(name, [0.0] * 8)
        sums = [a + b for a, b in zip(old[4:], (wall, cpu, minor, major), strict=True)]
        merged[name] = [max(old[0], peak), rss, file, anon, *sums]
    print("| phase | peak RSS MiB | RSS after MiB (file + anon) | seconds | CPU s | faults minor / major |")
    print("|---|---|---|---|---|---|")
    for name, (peak, rss, file, anon, wall, cpu, minor, major) in merged.items():
        print(
            f"| {name} | {peak:.0f} | {rss:.0f} ({file:.0f} + {anon:.0f}) | {wall:.1f} | {cpu:.1f} | "
            f"{minor:.0f} / {major:.0f} |"
        )
    print(f"\noverall peak: {max(r[1][0] for r in phases.rows):.0f} MiB")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
