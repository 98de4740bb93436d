"""Every config in configs/examples/ loads and its task_options parse for its task (no model is built)."""

from pathlib import Path

import pytest

from latentforge.training.config import load_config
from latentforge.training.tasks.common import parse_options
from latentforge.training.tasks.dreambooth import DreamBoothOptions
from latentforge.training.tasks.embedding import EmbeddingTaskOptions
from latentforge.training.tasks.lora import LoRATaskOptions
from latentforge.training.tasks.unet import UNetTaskOptions

EXAMPLES = Path(__file__).parents[2] / "configs" / "examples"
OPTIONS = {
    "finetune-emoji.toml": UNetTaskOptions,
    "lora-style.toml": LoRATaskOptions,
    "embedding-emoji.toml": EmbeddingTaskOptions,
    "dreambooth-emoji.toml": DreamBoothOptions,
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == sorted(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_example_parses(name):
    config = load_config(EXAMPLES / name)
    options = parse_options(OPTIONS[name], config.task_options, name)
    assert options.init and options.init.endswith("latentforge-emoji.safetensors")
