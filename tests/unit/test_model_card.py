"""The model-card study tool (scripts/model_card.py, default_model_card.py, sample_grid.py) on tiny random
models and a tiny fake emoji-layout dataset (32x32, a dozen images), plus the downsampling study's smoke run.
"""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.checkpoints.exports import save_clip
from latentforge.checkpoints.single_file import save_single_file
from latentforge.evaluation.extractors import load_extractor
from latentforge.model import StableDiffusion, load
from latentforge.models.clip import CLIPConfig, CLIPModel
from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest

ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str):  # noqa: ANN202 (a module)
    """scripts/NAME.py as module NAME (registered, so that the scripts' `from model_card import` finds it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_card = _load_script("model_card")  # a study tool in scripts/, not in the library
CAPTION_HEIGHT, TITLE_HEIGHT = _card.CAPTION_HEIGHT, _card.TITLE_HEIGHT
CardInputs, CardSettings = _card.CardInputs, _card.CardSettings
NearestCaptionBaseline, caption_grid, choose_prompts = (
    _card.NearestCaptionBaseline,
    _card.caption_grid,
    _card.choose_prompts,
)
model_card, read_split, sample_rows, untrained_like = (
    _card.model_card,
    _card.read_split,
    _card.sample_rows,
    _card.untrained_like,
)
NAMES = [
    ("red apple", "food-fruit"),
    ("grinning face", "face-smiling"),
    ("cat face", "animal-mammal"),
    ("rocket", "transport-air"),
    ("france flag", "country-flag"),
    ("snowman", "sky & weather"),
]
HOLDOUT = [("birthday cake", "food-sweet"), ("octopus", "animal-marine"), ("monkey", "animal-mammal")]


def _emoji_dataset(root: Path) -> Path:
    """DATA/{train,holdout}/<style>/<id>.png + .txt with captions "<name>, <subcategory>, <style> style"."""
    rng = np.random.default_rng(0)
    for split, names in (("train", NAMES), ("holdout", HOLDOUT)):
        for style in ("google", "twitter"):
            folder = root / split / style
            folder.mkdir(parents=True)
            for i, (name, sub) in enumerate(names):
                coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((32, 32), Image.Resampling.BILINEAR).save(
                    folder / f"{i:04x}.png"
                )
                (folder / f"{i:04x}.txt").write_text(f"{name}, {sub}, {style} style\n")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card")
    torch.manual_seed(0)
    save_clip(CLIPModel(CLIPConfig()), root / "clip.safetensors")  # 32x32 images, 32-d embeddings
    model = StableDiffusion.from_family(TINY)
    sd = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    save_single_file(root / "tiny.safetensors", *sd, TINY)
    return {
        "clip": root / "clip.safetensors",
        "model": root / "tiny.safetensors",
        "data": _emoji_dataset(root / "emoji"),
    }


def test_card_runs_end_to_end_and_writes_the_expected_keys(files: dict[str, Path], tmp_path: Path) -> None:
    settings = CardSettings.quick(
        images=8, sweep_images=4, size=32, steps=3, step_counts=(2, 3), cfg_scales=(1.0, 3.0),
        speed_repeats=2, batch_size=4,
    )  # fmt: skip
    inputs = CardInputs(files["model"], files["clip"], files["data"])
    model_card(inputs, tmp_path / "card", settings, progress=False)
    card = json.loads((tmp_path / "card" / "metrics.json").read_text())
    assert set(card["comparison"]) == {"ours", "untrained", "nearest_neighbour"}
    for method in card["comparison"].values():
        assert set(method) == {"train_prompts", "holdout_prompts"}
        for result in method.values():
            assert {"fid", "kid", "precision", "recall", "clip_score"} <= set(result["values"])
            assert result["counts"]["generated"]["used"] >= 8
    assert card["reference"]["used"] == 2 * len(HOLDOUT)
    assert set(card["steps"]) == {"DDIM", "Euler", "DPM++ 2M"}
    assert [row["steps"] for row in card["steps"]["Euler"]] == [2, 3]
    assert all("fid" in row and "clip_score" in row for rows in card["steps"].values() for row in rows)
    assert [row["cfg"] for row in card["cfg"]] == [1.0, 3.0]
    assert len(card["speed"]["generate_s"]) == 2 and card["speed"]["generate_median_s"] > 0
    for name in ("tables.md", "comparison.md", "steps.md", "cfg.md", "speed.md", "steps.png", "cfg.png"):
        assert (tmp_path / "card" / name).is_file(), name
    assert "nearest training image" in (tmp_path / "card" / "comparison.md").read_text()
    # the images generated for the comparison carry their prompts (CLIP score reads them back)
    first = sorted((tmp_path / "card" / "comparison" / "ours" / "holdout_prompts" / "images").glob("*.txt"))[
        0
    ]
    assert first.read_text().strip().endswith("style")


def test_comparison_of_ours_alone_on_chosen_prompt_sets(files: dict[str, Path], tmp_path: Path) -> None:
    """--no-baselines --prompt-sets holdout_prompts: one row, the same numbers as in the full comparison."""
    settings = CardSettings.quick(images=8, size=32, steps=3, batch_size=4)
    inputs = CardInputs(files["model"], files["clip"], files["data"], parts=("comparison",))
    full = model_card(inputs, tmp_path / "full", settings, progress=False)["comparison"]
    alone = replace(settings, baselines=False, prompt_sets=("holdout_prompts",))
    ours = model_card(inputs, tmp_path / "ours", alone, progress=False)["comparison"]
    assert set(ours) == {"ours"} and set(ours["ours"]) == {"holdout_prompts"}
    assert ours["ours"]["holdout_prompts"]["values"] == full["ours"]["holdout_prompts"]["values"]
    assert "untrained" not in (tmp_path / "ours" / "comparison.md").read_text()


def test_nearest_neighbour_returns_the_training_image_of_an_exact_caption(files: dict[str, Path]) -> None:
    train = read_split(files["data"], "train")
    encode_text = load_extractor(f"clip:{files['clip']}").encode_text
    baseline = NearestCaptionBaseline(train, encode_text)
    assert baseline.nearest(train.captions) == list(range(len(train.captions)))
    images = baseline.images([train.captions[5]], seeds=(0, 1))
    assert len(images) == 2
    assert np.array_equal(np.asarray(images[0]), np.asarray(Image.open(train.paths[5]).convert("RGB")))


def test_choose_prompts_covers_the_requested_image_count() -> None:
    captions = [f"caption {i}" for i in range(10)] + ["caption 0"]
    prompts, seeds = choose_prompts(captions, 25, seed=3)
    assert len(prompts) == 10 and seeds == [3, 4, 5]
    prompts, seeds = choose_prompts(captions, 4, seed=3)
    assert len(set(prompts)) == 4 and seeds == [3]


def test_untrained_baseline_shares_encoders_and_reinitialises_the_unet(files: dict[str, Path]) -> None:
    model = load(files["model"])
    torch.manual_seed(123)  # the baseline must not depend on the global state
    untrained = untrained_like(model, seed=1)
    assert untrained.vae is model.vae and untrained.text_encoder is model.text_encoder
    assert untrained.unet.config == model.unet.config
    weight = next(iter(model.unet.state_dict()))
    assert not torch.equal(untrained.unet.state_dict()[weight], model.unet.state_dict()[weight])
    again = untrained_like(model, seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(untrained.unet.parameters(), again.unet.parameters(), strict=True)
    )


def test_sample_grid_has_one_captioned_row_per_prompt(files: dict[str, Path]) -> None:
    model = load(files["model"])
    params = GenerationRequest(steps=2, width=32, height=32)
    prompts = ["red apple, food-fruit, google style", "rocket, transport-air, twitter style"]
    rows = sample_rows(model, prompts, [0, 1, 7], params)
    assert [len(row) for row in rows] == [3, 3] and rows[0][0].size == (32, 32)
    assert not np.array_equal(np.asarray(rows[0][0]), np.asarray(rows[0][1]))  # seeds differ
    grid = caption_grid(rows, prompts, cell=40)
    assert grid.size == (3 * 40, 2 * (40 + CAPTION_HEIGHT))
    caption_strip = np.asarray(grid)[40 : 40 + CAPTION_HEIGHT]
    assert (caption_strip < 128).any()  # the caption is drawn
    with pytest.raises(ValueError, match="one caption per row"):
        caption_grid(rows, prompts[:1])


STUDY_CONFIG = """
seed = 0
batch_size = 4
lr = 1e-3
ema_decay = 0.9
log_every = 1
[task_options]
data = "synthetic"
synthetic_items = 16
resolution = 16
sample_prompts = ["a red circle on a blue background"]
sample_seeds = [0]
sample_steps = 2
[task_options.vae_config]
ch_mult = {ch_mult}
z_channels = {channels}
embed_dim = {channels}
[task_options.unet]
in_channels = {channels}
out_channels = {channels}
model_channels = 32
channel_mult = [1]
num_res_blocks = 1
attention_levels = [0]
context_dim = 32
"""


def test_downsampling_study_smoke_run(tmp_path: Path) -> None:
    study = _load_script("downsampling_study")
    configs = {}
    for factor, ch_mult, channels in ((1, [1], 3), (2, [1, 2], 4)):
        configs[factor] = tmp_path / f"study_f{factor}.toml"
        configs[factor].write_text(STUDY_CONFIG.format(ch_mult=ch_mult, channels=channels))
    result = study.run_study(
        configs, tmp_path / "out", budget_seconds=1.5, features="random", evals=2, images=4, probe_steps=4,
        sample_steps=2, progress=False,
    )  # fmt: skip
    assert set(result["factors"]) == {"1", "2"}
    for entry in result["factors"].values():
        plan, points = entry["plan"], entry["points"]
        assert plan["max_steps"] == max(1, int(1.5 / plan["step_seconds"]))
        assert [p["step"] for p in points][-1] == plan["max_steps"] and len(points) >= 2
        assert all(np.isfinite(p["fid"]) for p in points)
        assert points[0]["seconds"] <= points[-1]["seconds"]
        floor = entry["first_stage"]  # the autoencoder's reconstructions of every reference image
        reference = sorted((tmp_path / "out" / "reference").glob("*.png"))
        assert floor["images"] == len(reference) and np.isfinite(floor["fid"]) and 0 < floor["psnr"] < 100
    report = (tmp_path / "out" / "study.md").read_text()
    assert (tmp_path / "out" / "study.png").is_file() and "| 2 |" in report and "First stage alone" in report
    again = study.run_study(  # a re-run reuses the plan, the training and the evaluations
        configs, tmp_path / "out", budget_seconds=99.0, features="random", evals=2, images=4, probe_steps=4,
        sample_steps=2, progress=False,
    )  # fmt: skip
    assert again["factors"] == result["factors"]

    fixed = study.run_study(  # equal steps instead of equal wall time: no probe run, x-axis in images
        configs, tmp_path / "fixed", budget_seconds=None, steps=3, features="random", evals=2, images=4,
        sample_steps=2, progress=False,
    )  # fmt: skip
    for entry in fixed["factors"].values():
        assert entry["plan"]["max_steps"] == 3 and entry["plan"]["step_seconds"] is None
        assert [p["step"] for p in entry["points"]][-1] == 3
    assert not list((tmp_path / "fixed").glob("probe_*"))
    assert "3 steps of" in (tmp_path / "fixed" / "study.md").read_text()


def test_scripts_run_from_the_command_line(files: dict[str, Path], tmp_path: Path) -> None:
    card = _load_script("default_model_card")
    argv = [
        "--model",
        files["model"],
        "--clip",
        files["clip"],
        "--data",
        files["data"],
        "--out",
        tmp_path / "c",
    ]
    argv += ["--quick", "--parts", "speed", "--size", "32", "--speed-repeats", "2"]
    assert card.main([str(a) for a in argv]) == 0
    written = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert "speed" in written and "comparison" not in written
    assert "64x64" not in (tmp_path / "c" / "speed.md").read_text()  # --size reached the measurement
    grid = _load_script("sample_grid")
    out = tmp_path / "grid.png"
    argv = [
        "--model",
        files["model"],
        "--out",
        out,
        "--seeds",
        "0-1",
        "--steps",
        "2",
        "--size",
        "32",
        "--cell",
        "32",
    ]
    assert grid.main([str(a) for a in argv]) == 0
    assert Image.open(out).size == (2 * 32, 9 * (32 + CAPTION_HEIGHT))
    # Two models side by side, titled: the same model twice gives two identical panels.
    pair = tmp_path / "pair.png"
    argv[argv.index(out)] = pair
    argv += ["--model", files["model"], "--label", "before", "--prompts", _prompts(tmp_path)]
    with pytest.raises(SystemExit):  # one --label per --model
        grid.main([str(a) for a in argv])
    argv += ["--label", "after"]
    assert grid.main([str(a) for a in argv]) == 0
    image = np.asarray(Image.open(pair).convert("RGB"))
    panel_height = 2 * (32 + CAPTION_HEIGHT)
    assert image.shape == (TITLE_HEIGHT + panel_height, 2 * 64 + 16, 3)
    left, right = image[TITLE_HEIGHT:, :64], image[TITLE_HEIGHT:, 64 + 16 :]
    assert np.array_equal(left, right) and (image[:TITLE_HEIGHT] < 128).any()  # titles drawn


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("red apple, food-fruit, google style\nrocket, transport-air, twitter style\n")
    return path
