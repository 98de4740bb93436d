"""Every config in configs/examples/ and configs/default/ loads and its task_options parse for its task."""

from pathlib import Path

import pytest

import latentforge
from latentforge.checkpoints.loading import DEFAULT_MODEL_FILE
from latentforge.training.config import load_config
from latentforge.training.tasks.clip import CLIPTaskOptions
from latentforge.training.tasks.common import parse_options
from latentforge.training.tasks.dreambooth import DreamBoothOptions
from latentforge.training.tasks.embedding import EmbeddingTaskOptions
from latentforge.training.tasks.lora import LoRATaskOptions
from latentforge.training.tasks.unet import UNetTask, UNetTaskOptions
from latentforge.training.tasks.vae import VAETaskOptions

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


DEFAULT = Path(__file__).parents[2] / "configs" / "default"
RECIPE = Path(__file__).parents[2] / "scripts" / "train_default_model.sh"
DEFAULT_OPTIONS = {
    "clip": CLIPTaskOptions,
    "vae": VAETaskOptions,
    "unet": UNetTaskOptions,
    "study": UNetTaskOptions,
}


@pytest.mark.parametrize("path", sorted(DEFAULT.glob("*.toml")), ids=lambda p: p.name)
def test_default_model_recipe_config_parses(path):
    """The default model's recipe configs (scripts/train_default_model.sh) parse for their task."""
    config = load_config(path)
    parse_options(DEFAULT_OPTIONS[path.name.split("_")[0].split(".")[0]], config.task_options, path.name)


@pytest.mark.parametrize("name", ["unet_v2_increment", "unet_v2_free_form"])
def test_default_model_increment_starts_from_the_shipped_model(name):
    """The recipe's increment configs are accepted with their init, the package's model (family kept)."""
    assert "INCREMENT:-unet_v2_free_form" in RECIPE.read_text() and name in RECIPE.read_text()
    config = load_config(DEFAULT / f"{name}.toml")
    init = Path(__file__).parents[2] / config.task_options["init"]
    assert init.resolve() == (Path(latentforge.__file__).parent / "assets" / DEFAULT_MODEL_FILE).resolve()
    options = dict(config.task_options, init=str(init))
    task = UNetTask(options, explicit=set(options))
    assert task.family.name == "latentforge-emoji" and task.family.unet.in_channels == 8
    assert config.lr_schedule == "cosine" and config.min_lr == 0.0 and config.warmup_steps < config.max_steps


def test_default_model_v3_continues_from_the_committed_step():
    """Stage 3 of the recipe's v3 continues on a new machine from the one committed step
    (artefacts/default-v3/unet_v3/step-NNNNNNN.safetensors) with unet_v3_free_form.toml: that file is
    accepted as init, and it is conditioned on CLIP v3's text tower, the one committed beside it."""
    import torch

    from latentforge.checkpoints.exports import load_clip

    root = Path(__file__).parents[2]
    recipe = RECIPE.read_text()
    assert "INC_ART=artefacts/default-v3/unet_v3" in recipe and "unet_v3_free_form.toml" in recipe
    (step,) = sorted((root / "artefacts" / "default-v3" / "unet_v3").glob("step-*.safetensors"))
    assert len(step.stem) == len("step-0000000") and step.stem[5:].isdigit()
    config = load_config(DEFAULT / "unet_v3_free_form.toml")
    options = dict(config.task_options, init=str(step))
    task = UNetTask(options, explicit=set(options))
    assert task.family.name == "latentforge-emoji" and task.family.unet.in_channels == 8
    assert config.lr_schedule == "constant" and config.ema_start == 0 and options["dropout"] == 0.1
    clip_v3 = load_clip(root / "artefacts" / "default-v3" / "clip_v3" / "final.safetensors").text.state_dict()
    text = task.text_encoder.state_dict()
    assert set(clip_v3) - set(text) == {"text_projection.weight"}  # the U-Net reads hidden states only
    assert all(torch.equal(text[k].float(), clip_v3[k].float()) for k in text)
