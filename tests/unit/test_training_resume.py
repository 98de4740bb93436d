"""Exact resume: a run SIGKILLed mid-step, or while writing a checkpoint, then resumed, ends bit-identical."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge.training import checkpointing
from latentforge.training.config import RunConfig, save_config
from latentforge.training.logging import read_log
from latentforge.training.loop import train
from training_toy import make_toy_task

TOY = Path(__file__).parents[1] / "training_toy.py"
STEPS, EVERY = 30, 10


def resume_config(run_dir: Path) -> RunConfig:
    """fp32 on CPU with everything a resume must restore: dropout, task noise, EMA, accumulation, epochs."""
    return RunConfig(
        run_dir=str(run_dir),
        task="toy",
        max_steps=STEPS,
        batch_size=8,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=3,
        ema_decay=0.9,
        checkpoint_every=EVERY,
        keep_checkpoints=5,
        log_every=5,
        device="cpu",
        deterministic=True,
    )


def run_toy(config_path: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, str(TOY), str(config_path), *overrides],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (threads = 1 here and in the subprocesses)."""
    run_dir = tmp_path_factory.mktemp("reference")
    config = resume_config(run_dir)
    train(make_toy_task(config), config)
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical export (EMA), weights, optimizer state and logged losses."""
    final_a, final_b = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    state_a = checkpointing.load_checkpoint(a / "checkpoints" / f"step_{STEPS}.pt")
    state_b = checkpointing.load_checkpoint(b / "checkpoints" / f"step_{STEPS}.pt")
    assert all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    for i, moments in state_a["optimizer"]["state"].items():
        assert all(torch.equal(v, state_b["optimizer"]["state"][i][k]) for k, v in moments.items())
    losses = [[(row["step"], row["loss"], row["lr"]) for row in read_log(run / "log.csv")] for run in (a, b)]
    assert losses[0] == losses[1]


def test_sigkill_mid_run_then_resume_is_bit_exact(reference, tmp_path):
    kill_step = random.randrange(EVERY + 1, STEPS)  # after at least one checkpoint
    print(f"killing the run inside step {kill_step}")  # shown if the test fails
    config_path = tmp_path / "config.toml"
    save_config(resume_config(tmp_path / "run"), config_path)
    killed = run_toy(config_path, TOY_KILL_AT_STEP=str(kill_step))
    assert killed.returncode == -signal.SIGKILL, (kill_step, killed.stderr)
    saved = [step for step, _ in checkpointing.list_checkpoints(tmp_path / "run")]
    assert saved == list(range(EVERY, kill_step + 1, EVERY)), kill_step
    assert not (tmp_path / "run" / "final.safetensors").exists()
    resumed = run_toy(config_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'run' / 'checkpoints'}/step_{saved[-1]}.pt" in resumed.stdout
    assert_same_run(reference, tmp_path / "run")


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    config_path = tmp_path / "config.toml"
    save_config(resume_config(tmp_path / "run"), config_path)
    killed = run_toy(config_path, TOY_KILL_IN_SAVE_STEP=str(2 * EVERY))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [f"step_{EVERY}.pt", f"step_{2 * EVERY}.pt.tmp"]
    resumed = run_toy(config_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step_{EVERY}.pt at step {EVERY}" in resumed.stdout
    assert not any(p.suffix == ".tmp" for p in folder.iterdir())
    assert_same_run(reference, tmp_path / "run")


# ---------------------------------------------------------------------------- nothing lost (issue 19)


def _killed_run(tmp_path: Path, kill_step: int, *overrides: str) -> tuple[Path, Path]:
    """A run SIGKILLed inside `kill_step`: (config path, run dir)."""
    config_path = tmp_path / "config.toml"
    save_config(resume_config(tmp_path / "run"), config_path)
    killed = run_toy(config_path, *overrides, TOY_KILL_AT_STEP=str(kill_step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return config_path, tmp_path / "run"


def _damage(path: Path) -> None:
    """Cut a checkpoint in half, as a failing disk or a careless copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_newest_checkpoint_resumes_from_the_newest_loadable_one(reference, tmp_path):
    config_path, run = _killed_run(tmp_path, 2 * EVERY + 5)
    log_before = (run / "log.csv").read_bytes()
    _damage(run / "checkpoints" / f"step_{2 * EVERY}.pt")
    resumed = run_toy(config_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"not resuming from {run / 'checkpoints' / f'step_{2 * EVERY}.pt'}" in resumed.stdout
    assert f"step_{EVERY}.pt at step {EVERY}" in resumed.stdout
    assert (run / "checkpoints" / f"step_{2 * EVERY}.pt.unloadable").exists()  # kept, out of the way
    assert (run / "log.csv").read_bytes().startswith(log_before)  # appended, not rewritten
    assert_same_run(reference, run)


def test_all_checkpoints_corrupt_refuses_to_start_over_until_restart(reference, tmp_path):
    config_path, run = _killed_run(tmp_path, 2 * EVERY + 5)
    for _, path in checkpointing.list_checkpoints(run):
        _damage(path)
    before = {p.name: p.read_bytes() for p in [*(run / "checkpoints").iterdir(), run / "log.csv"]}
    refused = run_toy(config_path)
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("latentforge.training.checkpointing.CheckpointsUnloadable: none of the 2")
    assert f"step_{EVERY}.pt: " in error and f"step_{2 * EVERY}.pt: " in error and "--restart" in error
    after = {p.name: p.read_bytes() for p in [*(run / "checkpoints").iterdir(), run / "log.csv"]}
    assert after == before  # nothing renamed, pruned or rewritten

    restarted = run_toy(config_path, "restart=true")
    assert restarted.returncode == 0, restarted.stderr
    archive = run / "before-restart-1"
    assert f"now in {archive}" in restarted.stdout
    assert {
        p.name: p.read_bytes() for p in [*(archive / "checkpoints").iterdir(), archive / "log.csv"]
    } == before
    assert_same_run(reference, run)  # a fresh run from step 0
    assert "restart = false" in (run / "config.toml").read_text()  # the next resume does not restart again


def test_sigkill_during_pruning_keeps_a_checkpoint_to_resume_from(reference, tmp_path):
    config_path = tmp_path / "config.toml"
    save_config(resume_config(tmp_path / "run"), config_path)
    killed = run_toy(config_path, "keep_checkpoints=1", TOY_KILL_IN_PRUNE_STEP=str(2 * EVERY))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"
    assert [step for step, _ in checkpointing.list_checkpoints(run)] == [2 * EVERY]
    resumed = run_toy(config_path, "keep_checkpoints=1")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step_{2 * EVERY}.pt at step {2 * EVERY}" in resumed.stdout
    assert [step for step, _ in checkpointing.list_checkpoints(run)] == [STEPS]
    assert_same_run(reference, run)
