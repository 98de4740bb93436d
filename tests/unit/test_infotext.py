"""Infotext format and parse, checked on A1111's own format rules and a round trip."""

from PIL import Image

from latentforge.pipelines.infotext import format_infotext, parse_infotext, read_infotext, save_png

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
