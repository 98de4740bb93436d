"""`TASKS`: task name -> factory `(RunConfig) -> TrainingTask`, for `latentforge train TASK CONFIG`.

Factories import their module on first call, so listing the tasks stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentforge.training.config import RunConfig
    from latentforge.training.task import TrainingTask


def _clip(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.clip import make_clip_task

    return make_clip_task(config)


def _vae(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.vae import make_vae_task

    return make_vae_task(config)


def _unet(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.unet import make_unet_task

    return make_unet_task(config)


def _controlnet(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.controlnet import make_controlnet_task

    return make_controlnet_task(config)


def _lora(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.lora import make_lora_task

    return make_lora_task(config)


def _embedding(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.embedding import make_embedding_task

    return make_embedding_task(config)


def _dreambooth(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.dreambooth import make_dreambooth_task

    return make_dreambooth_task(config)


def _taesd(config: RunConfig) -> TrainingTask:
    from latentforge.training.tasks.taesd import make_taesd_task

    return make_taesd_task(config)


TASKS: dict[str, Callable[[RunConfig], TrainingTask]] = {
    "clip": _clip,
    "vae": _vae,
    "unet": _unet,
    "controlnet": _controlnet,
    "lora": _lora,
    "embedding": _embedding,
    "dreambooth": _dreambooth,
    "taesd": _taesd,
}
