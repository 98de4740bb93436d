"""Run `latentforge train TASK CONFIG` (any registered task) and SIGKILL it inside a step, for resume tests.

`python tests/training_kill.py TASK CONFIG [key=value ...]`; with KILL_AT_STEP=N in the environment the
process kills itself inside step N (1-based), after that step's first loss and before its update.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from latentforge.training.loop import run_training
from latentforge.training.tasks import TASKS


def _killing(factory, kill_at: int):  # noqa: ANN001, ANN202
    def make(config):  # noqa: ANN001, ANN202
        task = factory(config)
        loss, calls = task.loss, [0]

        def killing_loss(model, batch, generator):  # noqa: ANN001, ANN202
            calls[0] += 1
            if calls[0] == kill_at * config.grad_accum:
                os.kill(os.getpid(), signal.SIGKILL)
            return loss(model, batch, generator)

        task.loss = killing_loss
        return task

    return make


def main() -> None:
    torch.set_num_threads(1)
    task, config, *overrides = sys.argv[1:]
    kill_at = int(os.environ.get("KILL_AT_STEP", "-1"))
    tasks = {**TASKS, task: _killing(TASKS[task], kill_at)} if kill_at > 0 else TASKS
    run_training(task, config, overrides, tasks=tasks)


if __name__ == "__main__":
    main()
