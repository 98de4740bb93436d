"""Ledger rows for the model card from training runs: `python scripts/ledger_rows.py RUN_DIR ...`.

For each run directory (a `latentforge train` run, finished or not) prints one Markdown row for the card's
ledger (docs/default-model.md, second edition): stage, run, steps, CPU-hours (threads x wall time from
`log.csv`, which a resumed run continues) and the newest held-out evaluation in its log. `--since STEP`
counts only what came after STEP (the steps of one session: give the step the session resumed from).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from latentforge.training.config import load_config
from latentforge.training.logging import read_log

SHOWN = {  # task -> (log column, label, format) of the held-out metrics worth a ledger cell
    "vae": (
        ("eval/psnr", "PSNR", "{:.2f} dB"),
        ("eval/ssim", "SSIM", "{:.3f}"),
        ("eval/rfid_clip", "FID-CLIP", "{:.4f}"),
    ),
    "clip": (("eval/t2i_top1", "t2i top-1", "{:.3f}"), ("eval/t2i_top5", "top-5", "{:.3f}")),
    "unet": (("eval/loss", "eps-MSE", "{:.4f}"),),
}


def ledger_row(run_dir: Path, threads: int = 1, since: int = 0, machine: str = "") -> str:
    config = load_config(run_dir / "config.toml")
    rows = [r for r in read_log(run_dir / "log.csv") if r.get("time")]  # sectioned, append-only log
    if not rows:
        raise SystemExit(f"{run_dir / 'log.csv'} has no rows yet")
    last = rows[-1]
    start_time = max((float(r["time"]) for r in rows if int(r["step"]) <= since), default=0.0)
    hours = threads * (float(last["time"]) - start_time) / 3600
    evals = [r for r in rows if any(r.get(column) for column, _, _ in SHOWN.get(config.task, ()))]
    metrics = "-"
    if evals:
        row = evals[-1]
        cells = [f"{label} {fmt.format(float(row[c]))}" for c, label, fmt in SHOWN[config.task] if row.get(c)]
        metrics = f"step {row['step']}: " + ", ".join(cells)
    steps = f"{since} -> {last['step']} of {config.max_steps}"
    return f"| {date.today()} | {config.task} | {run_dir} | {steps} | {hours:.2f} | {metrics} | {machine} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--since", type=int, default=0, help="step this session started from")
    p.add_argument("--machine", default="", help="e.g. 'Xeon, AMX + AVX512-BF16, bf16, 1 thread'")
    args = p.parse_args(argv)
    for run in args.runs:
        print(ledger_row(run, args.threads, args.since, args.machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
