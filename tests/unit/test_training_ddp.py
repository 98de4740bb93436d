"""Two gloo processes under torchrun compute what one process with 2 accumulation steps computes.

Global micro-batch g = rank * grad_accum + a holds the same items and draws the same randomness in
both layouts, so only the gradient reduction differs: DDP's (g0 + g1) / 2 against g0 / 2 + g1 / 2.
For two processes both are exact in fp32 (halving is exact), so the runs agree bit for bit; with more
processes the summation order differs and agreement is to about 1e-6 relative.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentforge.training import checkpointing
from latentforge.training.config import RunConfig, save_config
from latentforge.training.logging import read_log
from latentforge.training.loop import train
from training_toy import make_toy_task

TOY = Path(__file__).parents[1] / "training_toy.py"


def ddp_config(run_dir: Path, grad_accum: int) -> RunConfig:
    return RunConfig(
        run_dir=str(run_dir),
        task="toy",
        max_steps=16,
        batch_size=8,
        grad_accum=grad_accum,
        lr=1e-2,
        warmup_steps=2,
        ema_decay=0.8,
        checkpoint_every=8,
        log_every=4,
        device="cpu",
    )


def torchrun(config_path: Path, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [*command, str(TOY), str(config_path)], env=environment, capture_output=True, text=True, timeout=300
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else checkpointing.load_checkpoint(path)["model"]


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    single = ddp_config(tmp_path / "single", grad_accum=2)
    train(make_toy_task(single), single)
    save_config(ddp_config(tmp_path / "ddp", grad_accum=1), tmp_path / "ddp.toml")
    result = torchrun(tmp_path / "ddp.toml")
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]

    for name in ("final.safetensors", "checkpoints/step_16.pt"):  # the EMA export, the raw weights
        ours, theirs = (_weights(tmp_path / run / name) for run in ("ddp", "single"))
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
    rows = [read_log(tmp_path / run / "log.csv") for run in ("ddp", "single")]
    assert [r["step"] for r in rows[0]] == ["4", "8", "12", "16"]  # rank 0 alone writes the log
    for a, b in zip(*rows, strict=True):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6 * abs(float(b["loss"]))


def test_killed_two_process_run_resumes_in_one_process(tmp_path):
    """processes * grad_accum is what must stay fixed, so 2 x 1 resumes as 1 x 2."""
    reference = ddp_config(tmp_path / "reference", grad_accum=2)
    train(make_toy_task(reference), reference)
    save_config(ddp_config(tmp_path / "run", grad_accum=1), tmp_path / "ddp.toml")
    killed = torchrun(tmp_path / "ddp.toml", TOY_KILL_AT_STEP="11")
    assert killed.returncode != 0
    assert [step for step, _ in checkpointing.list_checkpoints(tmp_path / "run")] == [8]
    resumed = ddp_config(tmp_path / "run", grad_accum=2)
    task = make_toy_task(resumed)
    train(task, resumed)
    assert task.calls == 2 * 8  # steps 8..15 only
    final = load_file(tmp_path / "run" / "final.safetensors")
    for key, value in load_file(tmp_path / "reference" / "final.safetensors").items():
        torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-7)
