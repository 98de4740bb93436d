"""`latentforge convert MODEL DIR --to diffusers`: diffusers' StableDiffusionPipeline loads the folder with
no missing or unexpected keys and computes what we compute; our own `load(DIR)` gives back the same bits."""

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from latentforge import cli
from latentforge.checkpoints.single_file import save_single_file
from latentforge.model import StableDiffusion, load
from latentforge.models.families import FAMILIES
from references import assert_close, randomize_norms

TOLERANCE = 1e-5  # fp32, same weights: only summation order differs
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, (oil painting)"]


def _random_model(tmp_path, family_name: str):
    torch.manual_seed(0)
    model = StableDiffusion.from_family(FAMILIES[family_name])
    for module in (model.unet, model.vae, model.text_encoder):
        randomize_norms(module)
    path = tmp_path / f"{family_name}.safetensors"
    parts = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    save_single_file(path, *parts, model.family)
    return model, path


@pytest.mark.parametrize("family_name", ["tiny", "tiny-sd2-v"])
def test_diffusers_loads_the_converted_folder_and_agrees(tmp_path, family_name, capsys):
    ours, path = _random_model(tmp_path, family_name)
    out = tmp_path / "diffusers"
    assert cli.main(["convert", str(path), str(out), "--to", "diffusers", "--dtype", "fp32"]) == 0
    assert "diffusers" in capsys.readouterr().out
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        _, info = cls.from_pretrained(out / sub, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
        assert not problems and not info.get("error_msgs"), (sub, info)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    family = ours.family
    expected_prediction = {"epsilon": "epsilon", "v": "v_prediction"}[family.prediction]
    assert pipe.scheduler.config.prediction_type == expected_prediction
    assert pipe.unet.config.sample_size * 2 == family.default_size  # f = 2 for the tiny VAEs
    assert pipe.vae.config.scaling_factor == family.latent_scale

    x = torch.randn(2, family.unet.in_channels, 16, 16)
    t = torch.tensor([999.0, 37.0])
    context = torch.randn(2, 7, family.unet.context_dim)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
        assert_close(ours.unet(x, t, context), theirs, TOLERANCE)
        assert_close(ours.vae.decode(x[:1]), pipe.vae.decode(x[:1]).sample, TOLERANCE)
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ids, ours.tokenizer(PROMPTS))  # vocab.json/merges.txt and the pad token
        assert_close(ours.text_encoder(ids)[0], pipe.text_encoder(ids).last_hidden_state, TOLERANCE)


@pytest.mark.parametrize("family_name", ["tiny", "tiny-sd2", "tiny-sd2-v"])
def test_our_load_of_the_folder_round_trips_bit_exactly(tmp_path, family_name):
    ours, path = _random_model(tmp_path, family_name)
    out = tmp_path / "diffusers"
    assert cli.main(["convert", str(path), str(out), "--to", "diffusers", "--dtype", "fp32"]) == 0
    back = load(out)
    family = ours.family
    if family.text_encoder.projection_dim is None:
        assert back.family == family
    else:  # the projection (unused by SD 2.x generation) is not part of a diffusers pipeline
        expected = replace(
            family,
            name=f"{family.name}-noproj",
            text_encoder=replace(family.text_encoder, projection_dim=None),
        )
        assert back.family == expected
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(ours, name).state_dict()
        mine = getattr(back, name).state_dict()
        theirs = {k: v for k, v in theirs.items() if not k.startswith("text_projection.")}
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_existing_output_is_refused(tmp_path, capsys):
    _, path = _random_model(tmp_path, "tiny")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli.main(["convert", str(path), str(tmp_path / "full"), "--to", "diffusers"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert cli.main(["convert", str(path), str(tmp_path / "full")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_single_file_is_still_the_default_and_reads_back_the_diffusers_folder(tmp_path):
    ours, path = _random_model(tmp_path, "tiny-sd2-v")
    folder, single = tmp_path / "diffusers", tmp_path / "back.safetensors"
    assert cli.main(["convert", str(path), str(folder), "--to", "diffusers", "--dtype", "fp32"]) == 0
    assert cli.main(["convert", str(folder), str(single)]) == 0  # fp16 by default
    back = load(single)
    assert back.family.prediction == "v" and back.family.default_size == ours.family.default_size
    expected = {k: v.half().float() for k, v in ours.unet.state_dict().items()}
    assert all(torch.equal(back.unet.state_dict()[k], v) for k, v in expected.items())
