"""A corpus of A1111-style infotexts (tests/data/a1111_infotexts) parsed without loss.

The files follow A1111's create_infotext format across versions (before 1.9 with combined sampler names,
1.9/1.10 with "Schedule type"), hires fix, img2img/inpaint, LoRA/TI hashes, ADetailer and ControlNet keys,
and exports of ComfyUI, Forge and NovelAI; expected.json holds hand-written values for them.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.errors import ParameterError
from latentforge.pipelines.infotext import (
    dropped_text,
    format_infotext,
    parse_infotext,
    read_infotext,
    save_image,
)
from latentforge.sampling.registry import SAMPLERS, split_sampler_name
from latentforge.sampling.schedules import SCHEDULES

CORPUS = Path(__file__).parents[1] / "data" / "a1111_infotexts"
FILES = sorted(CORPUS.glob("*.txt"))
EXPECTED = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
TEMPLATE_KEYS = ("Template", "Negative Template")

# A1111 1.10's sampler names and schedulers (name, label, aliases): modules/sd_samplers_kdiffusion.py,
# sd_samplers_timesteps.py, sd_schedulers.py.
A1111_SAMPLERS = {
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
    "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
    "PLMS", "UniPC", "LCM",
}  # fmt: skip
A1111_SCHEDULERS = [
    ("automatic", "Automatic", ()), ("uniform", "Uniform", ()), ("karras", "Karras", ()),
    ("exponential", "Exponential", ()), ("polyexponential", "Polyexponential", ()),
    ("sgm_uniform", "SGM Uniform", ("SGMUniform",)), ("kl_optimal", "KL Optimal", ()),
    ("align_your_steps", "Align Your Steps", ()), ("simple", "Simple", ()), ("normal", "Normal", ()),
    ("ddim", "DDIM", ()), ("beta", "Beta", ()),
]  # fmt: skip


def a1111_sampler_and_schedule(sampler: str, schedule_type: str | None) -> tuple[str | None, str | None]:
    """What A1111 1.10 runs (get_sampler_and_scheduler, convert_automatic=False); (None, None) for a sampler
    A1111 does not know (it silently falls back to its default there)."""
    by_name = {key: label for name, label, _ in A1111_SCHEDULERS for key in (name, label)}
    schedule = by_name.get(schedule_type or "", "Automatic")
    for name, label, aliases in A1111_SCHEDULERS:
        for option in (label, name, *aliases):
            if sampler.endswith(" " + option):
                schedule, sampler = label, sampler[: -len(option) - 1]
                break
    return (sampler, schedule) if sampler in A1111_SAMPLERS else (None, None)


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # not read_text: keep CRLF files as they are


def _written(key: str, value: str, text: str) -> bool:
    """The pair appears in the text as written: plain, or JSON-quoted (with or without \\u escapes)."""
    forms = (value, json.dumps(value, ensure_ascii=False), json.dumps(value))
    return any(f"{key}: {form}" in text or f"{key}:{form}" in text for form in forms)


def test_corpus_is_covered():
    assert len(FILES) >= 30
    assert {path.name for path in FILES} == set(EXPECTED) - {"_about"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_parsed_without_loss(path):
    text = _text(path)
    expected = EXPECTED[path.name]
    prompt, negative, params = parse_infotext(text)
    assert dropped_text(text) == expected.get("dropped", [])
    for key, value in params.items():
        assert _written(key, value, text), f"{key}: {value!r} is not in the file as written"
    assert len(params) >= 3
    if "prompt" in expected:
        assert prompt == expected["prompt"]
    if "negative" in expected:
        assert negative == expected["negative"]
    if "params" in expected:
        assert params == expected["params"]
    assert expected.get("some_params", {}).items() <= params.items()
    # Written again the way A1111 writes it, the file comes back line for line (line ends and outer spaces
    # aside) unless expected.json says why not.
    plain = {k: v for k, v in params.items() if k not in TEMPLATE_KEYS}
    again = format_infotext(prompt, negative, plain).strip()
    again += "".join(f"\n{key}: {params[key]}" for key in TEMPLATE_KEYS if key in params)
    original = "\n".join(line.strip() for line in text.strip().splitlines())
    if "rewritten_differs" not in expected:
        assert "\n".join(line.strip() for line in again.splitlines()) == original
    assert parse_infotext(again) == (prompt, negative, params)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_sampler_and_schedule_a1111_would_use(path):
    """The hand-written sampler/schedule of each file agree with A1111's rule and name ours."""
    expected = EXPECTED[path.name]
    params = parse_infotext(_text(path))[2]
    sampler, schedule = a1111_sampler_and_schedule(params["Sampler"], params.get("Schedule type"))
    assert (sampler, schedule) == (expected["sampler"], expected["schedule"])
    if sampler is not None:
        assert sampler in SAMPLERS and (schedule == "Automatic" or schedule in SCHEDULES)
    if "schedule_at_writing" in expected:
        assert expected["schedule_at_writing"] in SCHEDULES
        if schedule != "Automatic":  # an explicit schedule is what the image was made with
            assert expected["schedule_at_writing"] == schedule
    if "hires_sampler" in expected:
        hires = a1111_sampler_and_schedule(
            params.get("Hires sampler", params["Sampler"]),
            params.get("Hires schedule type", params.get("Schedule type")),
        )
        assert hires == (expected["hires_sampler"], expected["hires_schedule"])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_our_split_runs_what_a1111_runs(path):
    """`split_sampler_name` on each file's Sampler and Schedule type gives A1111's pair, and refuses a
    sampler A1111 does not know (where A1111 silently uses its default)."""
    expected = EXPECTED[path.name]
    params = parse_infotext(_text(path))[2]
    schedule = params.get("Schedule type", "Automatic")
    pairs = [(params["Sampler"], schedule, expected["sampler"], expected["schedule"])]
    if "hires_sampler" in expected:
        hires = (params.get("Hires sampler", params["Sampler"]), params.get("Hires schedule type", schedule))
        pairs.append((*hires, expected["hires_sampler"], expected["hires_schedule"]))
    for name, schedule, sampler, expected_schedule in pairs:
        if sampler is None:
            with pytest.raises(ParameterError, match="unknown sampler"):
                split_sampler_name(name, schedule)
        else:
            assert split_sampler_name(name, schedule) == (sampler, expected_schedule)


def test_rule_splits_legacy_names():
    """The reference rule itself, on the names the brief lists."""
    assert a1111_sampler_and_schedule("DPM++ 2M Karras", None) == ("DPM++ 2M", "Karras")
    assert a1111_sampler_and_schedule("Euler a", None) == ("Euler a", "Automatic")
    assert a1111_sampler_and_schedule("DPM++ 2M SDE Exponential", None) == ("DPM++ 2M SDE", "Exponential")
    assert a1111_sampler_and_schedule("DPM++ 2M", "Karras") == ("DPM++ 2M", "Karras")
    assert a1111_sampler_and_schedule("Euler SGMUniform", None) == ("Euler", "SGM Uniform")
    assert a1111_sampler_and_schedule("DDIM", None) == ("DDIM", "Automatic")
    assert a1111_sampler_and_schedule("k_euler_a", None) == (None, None)


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_corpus_survives_image_files(tmp_path, suffix):
    image = Image.fromarray(np.full((8, 8, 3), 127, np.uint8))
    for path in FILES:
        text = _text(path)
        assert read_infotext(save_image(image, tmp_path / f"{path.stem}.{suffix}", text)) == text
