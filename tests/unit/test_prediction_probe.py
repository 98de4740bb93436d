"""SD 2.x v-prediction detected from the weights: the fixtures (scripts/make_prediction_fixtures.py) are
tiny-sd2 U-Nets trained briefly with the epsilon and the v target, saved without latentforge metadata."""

from pathlib import Path

import pytest
import torch

from latentforge.checkpoints import loading
from latentforge.checkpoints.prediction_probe import EPSILON_THRESHOLD, eps_relative_error
from latentforge.checkpoints.reading import read_state_dict
from latentforge.checkpoints.single_file import detect_families, split_components, to_single_file_state_dict
from latentforge.checkpoints.writing import save_safetensors
from latentforge.model import StableDiffusion, load
from latentforge.models.families import FAMILIES, SD2, TINY
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import UNetModel
from latentforge.models.vae import AutoencoderKL

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EPS_FILE, V_FILE = FIXTURES / "tiny-sd2-eps.safetensors", FIXTURES / "tiny-sd2-v.safetensors"


def test_fixtures_are_small_community_style_files():
    for path in (EPS_FILE, V_FILE):
        assert path.stat().st_size < 1 << 20
        assert read_state_dict(path)[1] == {}  # no latentforge.family: detection must use the weights


@pytest.mark.parametrize(
    ("path", "name", "prediction", "size"),
    [(EPS_FILE, "tiny-sd2", "epsilon", 64), (V_FILE, "tiny-sd2-v", "v", 96)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_fixture_is_detected_without_flags(path, name, prediction, size, dtype):
    model = load(path, dtype=dtype)  # the probe runs in the loaded dtype
    assert model.family == FAMILIES[name]
    assert (model.family.prediction, model.family.default_size) == (prediction, size)


def test_the_probe_statistic_separates_the_fixtures_by_a_wide_margin():
    eps, v = load(EPS_FILE, prediction="epsilon"), load(V_FILE, prediction="v")
    assert eps_relative_error(eps.unet, eps.family) < EPSILON_THRESHOLD / 5
    assert eps_relative_error(v.unet, v.family) > EPSILON_THRESHOLD * 2


def test_explicit_prediction_runs_no_probe_and_takes_the_table_entry(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the probe must not run when the prediction is given")

    monkeypatch.setattr(loading, "probe_prediction", fail)
    as_v = load(EPS_FILE, prediction="v")  # the user overrides: the v entry, with its default size
    assert as_v.family == FAMILIES["tiny-sd2-v"]
    assert load(V_FILE, prediction="epsilon").family == FAMILIES["tiny-sd2"]
    assert load(V_FILE, prediction="x0").family == FAMILIES["tiny-sd2"].with_prediction("x0")


def test_families_with_one_prediction_are_not_probed(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("TINY has no v twin: nothing to probe")

    monkeypatch.setattr(loading, "probe_prediction", fail)
    model = StableDiffusion.from_family(TINY)
    parts = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    path = save_safetensors(tmp_path / "tiny.safetensors", to_single_file_state_dict(*parts, TINY))
    assert load(path).family == TINY


def test_full_size_sd2_shapes_fit_sd2_and_sd2_v_whose_default_size_is_768():
    with torch.device("meta"):
        parts = (UNetModel(SD2.unet), AutoencoderKL(SD2.vae), CLIPTextModel(SD2.text_encoder))
    state_dict = to_single_file_state_dict(*(p.state_dict() for p in parts), SD2)
    candidates = detect_families(split_components(state_dict), {}, "sd2.safetensors")
    assert [f.name for f in candidates] == ["sd2", "sd2-v"]
    assert loading._with_prediction(candidates, "v").default_size == 768
    assert loading._with_prediction(candidates, "epsilon").default_size == 512


def test_info_shows_the_detected_prediction_and_size(capsys):
    from latentforge import cli

    assert cli.main(["info", str(V_FILE)]) == 0
    out = capsys.readouterr().out
    assert "family: tiny-sd2-v" in out and "prediction: v" in out and "default size: 96" in out
