"""Emoji dataset builder on a small fake package: captions, split rule, compositing, idempotence."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from latentforge.data.emoji import (
    EmojiDatasetError,
    NpmPackage,
    build_emoji_dataset,
    caption_variants,
    fetch_package,
    free_form_captions,
    make_caption,
    split_fraction,
    sri_sha512,
    write_caption_variants,
)

STYLES = ("google", "twitter")


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    """4x4 RGBA: pixel (0, 0) fully transparent, the rest opaque `colour`."""
    image = Image.new("RGBA", (4, 4), (*colour, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _entry(name: str, unified: str, subcategory: str = "thing", **extra: object) -> dict:
    return {
        "name": name,
        "unified": unified,
        "image": unified.lower() + ".png",
        "short_names": [name.lower().replace(" ", "_")],
        "category": "Objects",
        "subcategory": subcategory,
        "has_img_google": True,
        "has_img_twitter": True,
        **extra,
    }


def _tones(unified: str, keys: list[str], twitter: bool = True) -> dict:
    return {
        key: {
            "unified": f"{unified}-{key}",
            "image": f"{unified}-{key}".lower() + ".png",
            "has_img_google": True,
            "has_img_twitter": twitter,
        }
        for key in keys
    }


def make_package(root: Path, n_plain: int = 24) -> Path:
    """A package folder like emoji-datasource-*: emoji.json, LICENSE and img/<style>/64/*.png."""
    entries = [
        _entry(
            "WOMAN SURFING",
            "1F3C4-200D-2640-FE0F",
            "person-sport",
            skin_variations=_tones("1F3C4-200D-2640-FE0F", ["1F3FB", "1F3FD"]),
        ),
        _entry(
            "PEOPLE HOLDING HANDS",
            "1F9D1-200D-1F91D-200D-1F9D1",
            "family",
            skin_variations=_tones("1F9D1-200D-1F91D-200D-1F9D1", ["1F3FB-1F3FB", "1F3FB-1F3FF"], False),
        ),
        _entry("SURFER", "1F3C4", "person-sport", obsoleted_by="1F3C4-200D-2642-FE0F"),
        _entry("MAN SURFING", "1F3C4-200D-2642-FE0F", "person-sport", obsoletes="1F3C4"),
        _entry("Andorra Flag", "1F1E6-1F1E9", "country-flag", has_img_twitter=False),
    ]
    entries += [_entry(f"THING {i}", f"E{i:03X}") for i in range(n_plain)]
    for entry in entries:
        variants = [entry, *(entry.get("skin_variations") or {}).values()]
        for style, colour in (("google", (255, 0, 0)), ("twitter", (0, 0, 255))):
            for variant in variants:
                if variant[f"has_img_{style}"]:
                    _png(root / "img" / style / "64" / variant["image"], colour)
    (root / "emoji.json").write_text(json.dumps(entries))
    (root / "LICENSE").write_text("The MIT License (MIT)\nCopyright (c) 2013 Cal Henderson\n")
    return root


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_package(tmp_path_factory.mktemp("pkg"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_captions_and_layout(package: Path, tmp_path: Path) -> None:
    out = tmp_path / "emoji"
    summary = build_emoji_dataset(out, package_dir=package, holdout_fraction=0.0)
    folder = out / "train" / "twitter"
    assert (folder / "1f3c4-200d-2640-fe0f-1f3fd.txt").read_text() == (
        "woman surfing, medium skin tone, person-sport, twitter style\n"
    )
    assert (out / "train/google/1f3c4-200d-2640-fe0f.txt").read_text().strip() == (
        "woman surfing, person-sport, google style"
    )
    # Two tones: both named; a repeated tone once. Twitter lacks these variants, so they are skipped.
    assert (out / "train/google/1f9d1-200d-1f91d-200d-1f9d1-1f3fb-1f3ff.txt").read_text().strip() == (
        "people holding hands, light skin tone, dark skin tone, family, google style"
    )
    assert (out / "train/google/1f9d1-200d-1f91d-200d-1f9d1-1f3fb-1f3fb.txt").read_text().strip() == (
        "people holding hands, light skin tone, family, google style"
    )
    assert not (folder / "1f9d1-200d-1f91d-200d-1f9d1-1f3fb-1f3ff.png").exists()
    assert (
        out / "train/google/1f1e6-1f1e9.txt"
    ).read_text().strip() == "andorra flag, country-flag, google style"
    assert not (folder / "1f1e6-1f1e9.png").exists()
    n_google = 3 + 3 + 1 + 1 + 1 + 24
    assert summary.counts["train"] == {"google": n_google, "twitter": n_google - 2 - 1}
    records = _records(out)
    assert len(records) == 2 * n_google - 3
    assert all((out / r["file_name"]).is_file() for r in records)
    licences = (out / "LICENSES.md").read_text()
    assert "Apache License 2.0" in licences and "CC-BY 4.0" in licences and "Cal Henderson" in licences


def test_alpha_composited_on_white(package: Path, tmp_path: Path) -> None:
    build_emoji_dataset(tmp_path / "e", package_dir=package, holdout_fraction=0.0)
    image = Image.open(tmp_path / "e/train/google/e000.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (255, 0, 0)


def test_split_is_stable_and_keeps_identities_whole(package: Path, tmp_path: Path) -> None:
    first = _records(build_emoji_dataset(tmp_path / "a", package_dir=package, holdout_fraction=0.3).out_dir)
    again = _records(build_emoji_dataset(tmp_path / "b", package_dir=package, holdout_fraction=0.3).out_dir)
    held = {r["unified"] for r in first if r["split"] == "holdout"}
    assert held == {r["unified"] for r in again if r["split"] == "holdout"}
    assert 0 < len({r["identity"] for r in first if r["split"] == "holdout"}) < 29
    splits_of: dict[str, set[str]] = {}
    for record in first:
        splits_of.setdefault(record["identity"], set()).add(record["split"])
        expected = "holdout" if split_fraction(record["identity"], 0) < 0.3 else "train"
        assert record["split"] == expected
    assert all(len(s) == 1 for s in splits_of.values())
    # Surfer and man surfing are linked by `obsoletes`: one identity.
    identity = {r["unified"]: r["identity"] for r in first}
    assert identity["1F3C4"] == identity["1F3C4-200D-2642-FE0F"]
    # Base emoji and its skin tones share an identity.
    assert identity["1F3C4-200D-2640-FE0F-1F3FB"] == identity["1F3C4-200D-2640-FE0F"]
    other_seed = _records(
        build_emoji_dataset(tmp_path / "c", package_dir=package, holdout_fraction=0.3, seed=1).out_dir
    )
    assert held != {r["unified"] for r in other_seed if r["split"] == "holdout"}


def test_rebuild_is_identical_and_atomic(package: Path, tmp_path: Path) -> None:
    out = tmp_path / "emoji"
    build_emoji_dataset(out, package_dir=package)
    before = _tree_digest(out)
    (out / "train" / "stray.txt").write_text("left over from a broken edit")
    build_emoji_dataset(out, package_dir=package)
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji"]  # no staging folders left


def test_refuses_to_replace_foreign_folder(package: Path, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(EmojiDatasetError, match="not an emoji dataset"):
        build_emoji_dataset(tmp_path / "photos", package_dir=package)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"not ours"


def test_make_caption_lower_cases_and_names_tones() -> None:
    entry = {"name": "WOMAN  SURFING", "subcategory": "person-sport"}
    assert (
        make_caption(entry, "1F3FE", "twitter")
        == "woman surfing, medium-dark skin tone, person-sport, twitter style"
    )


def test_fetch_package_verifies_and_extracts_cached_tarball(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    tarball = cache / "emoji-datasource-google-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(package / "emoji.json", "package/emoji.json")
        archive.add(package / "img/google/64/e000.png", "package/img/google/64/e000.png")
        archive.add(package / "img/twitter/64/e000.png", "package/img/twitter/64/e000.png")
    pinned = NpmPackage("emoji-datasource-google", "1.0.0", sri_sha512(tarball))
    extracted = fetch_package(pinned, "google", cache)
    assert (extracted / "emoji.json").is_file() and (extracted / "img/google/64/e000.png").is_file()
    assert not (extracted / "img/twitter").exists()
    tampered = NpmPackage("emoji-datasource-google", "1.0.0", "sha512-AAAA")
    (extracted.parent / ".integrity").unlink()
    monkeypatch.setenv("PATH", "")  # a mismatch would re-fetch with npm; never touch the network here
    with pytest.raises(EmojiDatasetError, match="npm"):
        fetch_package(tampered, "google", cache)


def test_caption_variants_drop_the_name_and_add_short_names() -> None:
    record = {
        "caption": "thumbs up sign, light skin tone, hand-fingers-closed, google style",
        "name": "thumbs up sign",
        "skin_tone": "light skin tone",
        "subcategory": "hand-fingers-closed",
        "style": "google",
        "short_names": ["+1", "thumbsup", "thumbs_up"],  # "thumbs up" adds no word to the name
    }
    assert caption_variants(record) == [
        "light skin tone, hand-fingers-closed, google style",
        "+1, light skin tone, hand-fingers-closed, google style",
        "thumbsup, light skin tone, hand-fingers-closed, google style",
    ]
    plain = {**record, "skin_tone": None, "short_names": ["thumbs_up"], "caption": "x"}
    assert caption_variants(plain) == ["hand-fingers-closed, google style"]


def test_free_form_captions_are_names_alone_and_with_the_style() -> None:
    record = {
        "caption": "red apple, food-fruit, google style",
        "name": "red apple",
        "skin_tone": None,
        "subcategory": "food-fruit",
        "style": "google",
        "short_names": ["apple", "red_apple"],  # "red_apple" is the name again
    }
    assert free_form_captions(record) == [
        "red apple",
        "red apple, google style",
        "apple",
        "apple, google style",
    ]
    assert free_form_captions({**record, "skin_tone": "light skin tone"}) == []


def test_write_caption_variants_adds_items_for_training_only(package: Path, tmp_path: Path) -> None:
    out = tmp_path / "emoji"
    build_emoji_dataset(out, package_dir=package, holdout_fraction=0.5)
    records = [r for r in _records(out) if r["split"] == "train"]
    counts = write_caption_variants(out, tmp_path / "clip")
    assert counts["images"] == len(records)
    written = sorted((tmp_path / "clip" / "train").rglob("*.png"))
    assert len(written) == counts["items"] == sum(1 + len(caption_variants(r)) for r in records)
    assert not (tmp_path / "clip" / "holdout").exists()
    first = records[0]
    stem = (tmp_path / "clip" / first["file_name"]).with_suffix("")
    assert stem.with_suffix(".txt").read_text() == first["caption"] + "\n"
    assert Path(f"{stem}-c1.txt").read_text() == caption_variants(first)[0] + "\n"
    assert Path(f"{stem}-c1.png").read_bytes() == (out / first["file_name"]).read_bytes()
    with pytest.raises(EmojiDatasetError, match="no 'test' records"):
        write_caption_variants(out, tmp_path / "clip", split="test")
    free = write_caption_variants(out, tmp_path / "free", free_form=True)
    extra = [len(set(free_form_captions(r)) - {r["caption"], *caption_variants(r)}) for r in records]
    assert free["items"] == counts["items"] + sum(extra) and sum(extra) > 0


def test_clip_holdout_tags_script(package: Path, tmp_path: Path) -> None:
    import importlib.util
    import sys

    from latentforge.checkpoints.exports import save_clip
    from latentforge.models.clip import CLIPConfig, CLIPModel

    out = tmp_path / "emoji"
    build_emoji_dataset(out, package_dir=package, holdout_fraction=0.0)
    save_clip(CLIPModel(CLIPConfig()), tmp_path / "clip.safetensors")
    path = Path(__file__).resolve().parents[2] / "scripts" / "clip_holdout_tags.py"
    spec = importlib.util.spec_from_file_location("clip_holdout_tags", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["clip_holdout_tags"] = module
    spec.loader.exec_module(module)
    report = module.tag_report(str(tmp_path / "clip.safetensors"), out, split="train", limit=20)
    assert report["images"] == 20
    assert 0 <= report["t2i_top1"] <= report["t2i_top5"] <= 1
    assert report["tags_only_ceiling_top1"] <= report["tags_only_ceiling_top5"] <= 1
    assert 0 <= report["zero_shot_subcategory_top1"] <= report["zero_shot_subcategory_top5"] <= 1
    free = module.free_form_report(str(tmp_path / "clip.safetensors"), out, prompts=6)
    assert free["free_form_prompts"] == 6 and 0 <= free["free_form_top1"] <= free["free_form_top5"] <= 1
    record = {
        "caption": "ok hand sign, light skin tone, hand-fingers-partial, google style",
        "subcategory": "hand-fingers-partial",
    }
    assert module.subcategory_prompts(record, ["keycap", "hand-fingers-partial"]) == [
        "light skin tone, keycap, google style",
        "light skin tone, hand-fingers-partial, google style",
    ]
