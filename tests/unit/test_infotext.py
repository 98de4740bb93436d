"""Infotext format and parse, checked on A1111's own format rules and a round trip."""

from PIL import Image

from latentforge.pipelines.infotext import (
    dropped_text,
    format_infotext,
    parse_infotext,
    read_infotext,
    save_png,
)

# An infotext as A1111 v1.9 writes it (format from modules/processing.py create_infotext).
A1111_SAMPLE = (
    "masterpiece, (best quality:1.2), 1girl\n"
    "with a second prompt line\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1234, b: 5678", Version: v1.9.0'
)


def test_parse_a1111_sample():
    prompt, negative, params = parse_infotext(A1111_SAMPLE)
    assert prompt == "masterpiece, (best quality:1.2), 1girl\nwith a second prompt line"
    assert negative == "lowres, bad anatomy"
    assert params["Steps"] == "20"
    assert params["Sampler"] == "DPM++ 2M"
    assert params["Schedule type"] == "Karras"
    assert params["Size"] == "512x768"
    assert params["Lora hashes"] == "a: 1234, b: 5678"
    assert params["Version"] == "v1.9.0"


def test_round_trip_with_quoting():
    params = {
        "Steps": 20,
        "Sampler": "Euler a",
        "CFG scale": 7.5,
        "Seed": 1,
        "Note": 'a, b: "c"\nd',
        "X": None,
    }
    text = format_infotext("a cat, sitting", "blurry\nugly", params)
    assert '"a, b: \\"c\\"\\nd"' in text and "X:" not in text
    prompt, negative, parsed = parse_infotext(text)
    assert prompt == "a cat, sitting" and negative == "blurry\nugly"
    assert parsed == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7.5",
        "Seed": "1",
        "Note": 'a, b: "c"\nd',
    }


def test_prompt_only_has_no_parameter_line():
    assert parse_infotext("just a prompt, nothing else") == ("just a prompt, nothing else", "", {})


def test_png_chunk(tmp_path):
    text = format_infotext("p", "", {"Steps": 1, "Seed": 2, "Size": "8x8"})
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)
    assert read_infotext(tmp_path / "a.png") == text
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert read_infotext(tmp_path / "b.png") is None


def test_values_that_would_not_parse_back_are_quoted():
    """A1111 quotes on , : and newline only; a leading quote or outer spaces must be quoted too."""
    params = {"Aa": '"quoted"', "Bb": " padded ", "Cc": "plain", "Dd": "x\ry", "Ee": 1}
    text = format_infotext("p", "", params)
    assert "Cc: plain" in text
    assert parse_infotext(text)[2] == {k: str(v) for k, v in params.items()}
    # A1111's key pattern needs two characters: a one-letter key is not a pair
    assert parse_infotext("p\nA: 1, Steps: 2, Seed: 3, Size: 8x8")[2] == {
        "Steps": "2",
        "Seed": "3",
        "Size": "8x8",
    }


def test_dynamic_prompts_template_lines():
    """sd-dynamic-prompts appends "Template:" / "Negative Template:" lines after the parameter line; A1111
    folds them into the negative prompt, here they are two keys and the rest parses as usual."""
    text = (
        "a red cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512\n"
        "Template: a {red|blue} cat\nwith a hat, __colours__\n"
        "Negative Template: blurry"
    )
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("a red cat", "blurry")
    assert params["Template"] == "a {red|blue} cat\nwith a hat, __colours__"
    assert params["Negative Template"] == "blurry" and params["Seed"] == "1"
    # the newer writer puts no space after the colon; a negative template alone is a block too
    only_negative = "p\nSteps: 1, Seed: 2, Size: 8x8\nNegative Template:{a|b}"
    assert parse_infotext(only_negative) == ("p", "", {"Steps": "1", "Seed": "2", "Size": "8x8",
                                                        "Negative Template": "{a|b}"})  # fmt: skip
    # a prompt line that merely starts with "Template:" is prompt text
    assert parse_infotext("Template: a cat\nSteps: 1, Seed: 2, Size: 8x8")[0] == "Template: a cat"


def test_negative_prompt_marker_mid_text_and_repeated():
    text = (
        "a sign reading Negative prompt: none\n"
        "Negative prompt: bad\nNegative prompt: worse\n"
        "Steps: 1, Seed: 2, Size: 8x8"
    )
    prompt, negative, _ = parse_infotext(text)
    assert prompt == "a sign reading Negative prompt: none"
    assert negative == "bad\nworse"  # A1111 strips the marker from every line that starts with it


def test_short_last_line_is_prompt_text():
    """A last line with fewer than 3 pairs is not a parameter line (A1111's rule), even if it has pairs."""
    text = "a cat\nNegative prompt: dog\nSteps: 20, Seed: 1"
    assert parse_infotext(text) == ("a cat", "dog\nSteps: 20, Seed: 1", {})


def test_dropped_text_reports_what_a1111_would_lose():
    text = 'p\nSteps: 20, Hires fix, Seed: 1, Size: 8x8, Seed: 2, Note: "a, b"'
    assert parse_infotext(text)[2]["Seed"] == "2"
    assert dropped_text(text) == ["Hires fix", "Seed: 1"]
    assert dropped_text(A1111_SAMPLE) == []
    assert dropped_text("just a prompt") == []
