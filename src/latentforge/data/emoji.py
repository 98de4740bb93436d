"""Emoji training set from iamcal's emoji-data npm packages (Noto Emoji and Twemoji artwork, 64x64).

Output layout (kohya / A1111 folders plus Hugging Face `imagefolder` metadata):
    out_dir/{train,holdout}/<style>/<image id>.png + .txt   RGB on white, caption in the .txt
    out_dir/metadata.jsonl   one record per image (file_name relative to out_dir)
    out_dir/dataset.json     pinned packages with integrity, rules, counts
    out_dir/LICENSES.md      artwork and data licences
Caption rule: "<name>[, <skin tone>[, <second skin tone>]], <subcategory>, <style> style", lower case.
`write_caption_variants` derives a training folder with extra captions per image (see there).
Split rule: an identity (a base emoji with all its skin tones, both styles, and the emoji linked to it
by `obsoletes`) is held out when sha256("latentforge-emoji-split:<seed>:<identity unified code>")
read as a fraction in [0, 1) is below `holdout_fraction`, so the split never depends on RNG state or
on which other emoji exist.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from latentforge.data.images import load_image_rgb
from latentforge.errors import LatentforgeError


@dataclass(frozen=True)
class NpmPackage:
    """A pinned npm tarball: name, version and its registry `integrity` (SRI sha512)."""

    name: str
    version: str
    integrity: str


PINNED_PACKAGES = {
    "google": NpmPackage(
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ),
    "twitter": NpmPackage(
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),
}

# Unicode names of the Fitzpatrick modifiers, as CLDR writes them in emoji names.
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

IMAGE_SIZE_FOLDER = "64"
BUILDER = "latentforge.data.emoji"
FORMAT_VERSION = 1

_ARTWORK_LICENSES = {
    "google": """## Google style: Noto Emoji artwork

- Images: `img/google/64` of the npm package {package}, taken from Noto Emoji
  (https://github.com/googlefonts/noto-emoji).
- Licence: **Apache License 2.0** (https://www.apache.org/licenses/LICENSE-2.0). The package README
  says: "Android/Google/Noto images, are available under the Apache License 2.0". Upstream, Noto
  Emoji's flag images (third_party/region-flags) are in the public domain or otherwise exempt from
  copyright; the Noto Color Emoji *font* is under the SIL Open Font License 1.1 and is not used here.
- Changes made: composited onto a white background and converted to 8-bit RGB.
""",
    "twitter": """## Twitter style: Twemoji artwork

- Images: `img/twitter/64` of the npm package {package}, taken from Twemoji (the maintained fork
  https://github.com/jdecked/twemoji).
- Licence: **Creative Commons Attribution 4.0 International (CC-BY 4.0)**
  (https://creativecommons.org/licenses/by/4.0/). The package README says: "Twitter images are
  available under the Creative Commons Attribution 4.0 license".
- Attribution: Copyright 2019 Twitter, Inc and other contributors; graphics licensed under CC-BY 4.0.
  Any model or image set derived from these files must keep this attribution.
- Changes made: composited onto a white background and converted to 8-bit RGB.
""",
}


class EmojiDatasetError(LatentforgeError):
    """The emoji packages could not be fetched, verified or read."""


@dataclass
class EmojiDatasetSummary:
    """What `build_emoji_dataset` wrote: image counts per split and style, identities, sources."""

    out_dir: Path
    counts: dict[str, dict[str, int]]
    identities: dict[str, int]
    packages: dict[str, dict[str, str | None]]
    missing_images: int = 0
    seconds: float = 0.0
    caption_examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"emoji dataset in {self.out_dir} ({self.seconds:.1f} s)"]
        for style, package in self.packages.items():
            lines.append(f"  {style}: {package['name']}@{package['version']} {package['integrity'] or ''}")
        for split, per_style in self.counts.items():
            styles = ", ".join(f"{style} {n}" for style, n in per_style.items())
            lines.append(f"  {split}: {self.identities[split]} identities; images: {styles}")
        if self.missing_images:
            lines.append(f"  {self.missing_images} listed images missing from the packages (skipped)")
        lines += [f"  e.g. {caption!r}" for caption in self.caption_examples]
        return "\n".join(lines)


def sri_sha512(path: Path) -> str:
    """Subresource-integrity string ("sha512-<base64>") of a file, as npm records it."""
    digest = hashlib.sha512()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def _npm_pack(package: NpmPackage, cache_dir: Path) -> Path:
    tarball = cache_dir / f"{package.name}-{package.version}.tgz"
    if not tarball.is_file() or sri_sha512(tarball) != package.integrity:
        npm = shutil.which("npm")
        if npm is None:
            raise EmojiDatasetError(
                "npm is not on PATH: install Node.js (npm) or pass package_dir= pointing at an "
                f"extracted {package.name} package"
            )
        command = [npm, "pack", f"{package.name}@{package.version}", "--pack-destination", str(cache_dir)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not tarball.is_file():
            raise EmojiDatasetError(f"`{' '.join(command)}` failed:\n{result.stderr.strip()}")
    actual = sri_sha512(tarball)
    if actual != package.integrity:
        raise EmojiDatasetError(
            f"{tarball}: integrity {actual} does not match the pinned {package.integrity}; "
            "delete the file and retry, or update PINNED_PACKAGES deliberately"
        )
    return tarball


def fetch_package(package: NpmPackage, style: str, cache_dir: Path) -> Path:
    """`npm pack` a pinned package into `cache_dir`, verify it, extract what we use; returns `package/`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{package.name}-{package.version}"
    marker = target / ".integrity"
    if marker.is_file() and marker.read_text() == package.integrity:
        return target / "package"
    tarball = _npm_pack(package, cache_dir)
    wanted = {"package/emoji.json", "package/LICENSE", "package/README.md", "package/package.json"}
    image_prefix = f"package/img/{style}/{IMAGE_SIZE_FOLDER}/"
    staging = cache_dir / f".{target.name}.extracting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tarball, "r:gz") as archive:
        members = [
            m
            for m in archive.getmembers()
            if m.isfile()
            and (
                m.name in wanted
                or (m.name.startswith(image_prefix) and "/" not in m.name[len(image_prefix) :])
            )
        ]
        archive.extractall(staging, members=members, filter="data")
    (staging / ".integrity").write_text(package.integrity)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target / "package"


def _identities(emoji: Sequence[dict]) -> dict[str, str]:
    """unified -> identity key: the smallest unified code among emoji linked by `obsoletes`."""
    parent = {e["unified"]: e["unified"] for e in emoji}

    def find(code: str) -> str:
        while parent[code] != code:
            code = parent[code]
        return code

    for entry in emoji:
        for other in (entry.get("obsoletes"), entry.get("obsoleted_by")):
            if isinstance(other, str) and other in parent:
                a, b = sorted((find(entry["unified"]), find(other)))
                parent[b] = a
    return {code: find(code) for code in parent}


def split_fraction(identity: str, seed: int) -> float:
    """Stable position of an identity in [0, 1): independent of RNG state, platform and other emoji."""
    digest = hashlib.sha256(f"latentforge-emoji-split:{seed}:{identity.upper()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def readable_name(entry: dict) -> str:
    """Lower-case display name: emoji.json's `name`, else the first short name with spaces."""
    name = entry.get("name") or entry.get("short_name") or entry["short_names"][0].replace("_", " ")
    return " ".join(name.lower().split())


def skin_tone_text(tone_key: str | None) -> str | None:
    """ "1F3FB-1F3FD" -> "light skin tone, medium skin tone"; a repeated tone is named once."""
    if not tone_key:
        return None
    names = [SKIN_TONES.get(code.upper(), code.lower()) for code in tone_key.split("-")]
    return ", ".join(dict.fromkeys(names))


def make_caption(entry: dict, tone_key: str | None, style: str) -> str:
    """The caption rule: name, skin tone(s), subcategory, style; lower case, comma separated."""
    parts = [readable_name(entry), skin_tone_text(tone_key), entry.get("subcategory"), f"{style} style"]
    return ", ".join(" ".join(p.lower().split()) for p in parts if p)


def _variants(entry: dict, style: str) -> list[tuple[str | None, dict]]:
    """(skin tone key or None, record with `image`, `unified`, `has_img_*`) for the base and each tone."""
    variants: list[tuple[str | None, dict]] = [(None, entry)]
    variants += sorted((entry.get("skin_variations") or {}).items())
    return [(tone, v) for tone, v in variants if v.get(f"has_img_{style}", True)]


def _package_record(package_dir: Path, pinned: NpmPackage | None) -> dict[str, str | None]:
    meta_path = package_dir / "package.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {
        "name": meta.get("name", pinned.name if pinned else None),
        "version": meta.get("version", pinned.version if pinned else None),
        "integrity": pinned.integrity if pinned else None,
        "license": meta.get("license"),
    }


def _licenses_markdown(styles: Sequence[str], packages: dict[str, dict], license_text: str) -> str:
    sections = [
        "# Licences of this emoji dataset\n",
        "Built by latentforge (`latentforge data emoji`) from the npm packages below. Each image is a",
        "modified copy of the artwork named in its style's section and keeps that artwork's licence.",
        "Captions and metadata are derived from emoji-data's `emoji.json` (MIT, below).\n",
    ]
    for style in styles:
        record = packages[style]
        label = f"`{record['name']}@{record['version']}` ({record['integrity'] or 'local package folder'})"
        sections.append(
            _ARTWORK_LICENSES.get(style, f"## {style}\n\nSee the package README.\n").format(package=label)
        )
    sections += [
        "## emoji-data (iamcal/emoji-data): emoji.json and packaging, MIT",
        "",
        "The `LICENSE` file shipped in the packages:",
        "",
        "```",
        license_text.strip(),
        "```",
        "",
    ]
    return "\n".join(sections)


def _prepare_target(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier emoji build (never delete user data)."""
    if not out_dir.exists():
        return
    manifest = out_dir / "dataset.json"
    is_ours = manifest.is_file() and json.loads(manifest.read_text()).get("builder") == BUILDER
    if not is_ours and any(out_dir.iterdir()):
        raise EmojiDatasetError(
            f"{out_dir} exists and is not an emoji dataset built by latentforge; choose a new or empty folder"
        )


def build_emoji_dataset(
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    styles: Sequence[str] = ("google", "twitter"),
    holdout_fraction: float = 0.05,
    seed: int = 0,
    package_dir: Path | None = None,
) -> EmojiDatasetSummary:
    """Build the emoji dataset in `out_dir` (see the module docstring for layout, captions and split).

    Args:
        out_dir: output folder; replaced atomically if it holds an earlier build.
        cache_dir: where `npm pack` tarballs and their extracted images live (default out_dir/../npm-cache).
        styles: image sets to include, "google" and/or "twitter".
        holdout_fraction: expected fraction of emoji identities held out.
        seed: salt of the split hash; the same seed gives the same split.
        package_dir: an extracted package (`emoji.json`, `img/<style>/64/*.png`) used for every style
            instead of npm; for tests and offline builds.
    Returns:
        An `EmojiDatasetSummary` (print it). Re-running with the same inputs writes identical files.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    _prepare_target(out_dir)
    sources: dict[str, Path] = {}
    packages: dict[str, dict[str, str | None]] = {}
    for style in styles:
        if package_dir is not None:
            sources[style] = Path(package_dir)
            packages[style] = _package_record(Path(package_dir), None)
        else:
            if style not in PINNED_PACKAGES:
                raise EmojiDatasetError(f"unknown style {style!r}; pinned styles: {sorted(PINNED_PACKAGES)}")
            cache = Path(cache_dir) if cache_dir is not None else out_dir.parent / "npm-cache"
            sources[style] = fetch_package(PINNED_PACKAGES[style], style, cache)
            packages[style] = _package_record(sources[style], PINNED_PACKAGES[style])

    first = sources[styles[0]]
    emoji = json.loads((first / "emoji.json").read_text(encoding="utf-8"))
    identity_of = _identities(emoji)
    license_path = first / "LICENSE"
    license_text = license_path.read_text(encoding="utf-8") if license_path.is_file() else "(no LICENSE file)"

    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    records: list[dict] = []
    identities: dict[str, set[str]] = {"train": set(), "holdout": set()}
    counts = {split: dict.fromkeys(styles, 0) for split in ("train", "holdout")}
    missing = 0
    for entry in emoji:
        identity = identity_of[entry["unified"]]
        split = "holdout" if split_fraction(identity, seed) < holdout_fraction else "train"
        for style in styles:
            for tone, variant in _variants(entry, style):
                source = sources[style] / "img" / style / IMAGE_SIZE_FOLDER / variant["image"]
                if not source.is_file():
                    missing += 1
                    continue
                image_id = Path(variant["image"]).stem
                folder = staging / split / style
                folder.mkdir(parents=True, exist_ok=True)
                load_image_rgb(source).save(folder / f"{image_id}.png", format="PNG")
                caption = make_caption(entry, tone, style)
                (folder / f"{image_id}.txt").write_text(caption + "\n", encoding="utf-8")
                identities[split].add(identity)
                counts[split][style] += 1
                records.append(
                    {
                        "file_name": f"{split}/{style}/{image_id}.png",
                        "caption": caption,
                        "split": split,
                        "style": style,
                        "name": readable_name(entry),
                        "unified": variant["unified"],
                        "base_unified": entry["unified"],
                        "identity": identity,
                        "skin_tone": skin_tone_text(tone),
                        "category": entry.get("category"),
                        "subcategory": entry.get("subcategory"),
                        "short_names": entry.get("short_names", []),
                    }
                )
    if not records:
        shutil.rmtree(staging, ignore_errors=True)
        raise EmojiDatasetError(
            f"no images found for styles {list(styles)} in {sorted(set(sources.values()))}"
        )
    records.sort(key=lambda r: r["file_name"])
    with (staging / "metadata.jsonl").open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    identity_counts = {split: len(ids) for split, ids in identities.items()}
    manifest = {
        "builder": BUILDER,
        "format_version": FORMAT_VERSION,
        "packages": packages,
        "styles": list(styles),
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "split_rule": "holdout iff sha256('latentforge-emoji-split:<seed>:<identity>')[:8]/2**64 < fraction",
        "caption_rule": "<name>[, <skin tone>...], <subcategory>, <style> style (lower case)",
        "counts": counts,
        "identities": identity_counts,
        "holdout_identities": sorted(identities["holdout"]),
    }
    (staging / "dataset.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (staging / "LICENSES.md").write_text(_licenses_markdown(styles, packages, license_text), encoding="utf-8")

    # Swap the finished build in: readers see the old folder or the new one, never a partial build.
    previous = out_dir.parent / f".{out_dir.name}.previous-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)

    examples = [r["caption"] for r in records if r["skin_tone"]][:2] + [r["caption"] for r in records][:2]
    return EmojiDatasetSummary(
        out_dir=out_dir,
        counts=counts,
        identities=identity_counts,
        packages=packages,
        missing_images=missing,
        seconds=time.perf_counter() - start,
        caption_examples=examples,
    )


def caption_variants(record: dict) -> list[str]:
    """Extra captions of one `metadata.jsonl` record, for training only (the default model's CLIP and U-Net).

    First the caption without the name ("<skin tones>, <subcategory>, <style> style"): what the image of
    an emoji the model never saw still shows, so the image tower must learn subcategories rather than
    identities. Then, for each of emoji-data's `short_names` that adds a word to the name ("birthday"
    for "birthday cake", "smiley cat"), the caption with the name replaced by it.
    """
    tags = [record.get("skin_tone"), record.get("subcategory"), f"{record['style']} style"]
    tail = ", ".join(t for t in tags if t)
    variants = [tail]
    name_words = set(record["name"].split())
    for short_name in record.get("short_names", []):
        alias = _alias(short_name)
        if alias and not set(alias.split()) <= name_words:
            variants.append(f"{alias}, {tail}")
    return list(dict.fromkeys(v for v in variants if v != record["caption"]))


def _alias(short_name: str) -> str:
    return " ".join(short_name.lower().replace("_", " ").replace("-", " ").split())


def free_form_captions(record: dict) -> list[str]:
    """Prompts a person types for one record: its name and each short name, alone and with the style
    ("red apple", "apple", "apple, google style"), without the subcategory the caption rule adds.

    Empty for skin-toned records: "thumbs up" alone should draw the default (yellow) one.
    """
    if record.get("skin_tone"):
        return []
    names = dict.fromkeys([record["name"], *(_alias(s) for s in record.get("short_names", []))])
    style = f"{record['style']} style"
    return [c for n in names if n for c in (n, f"{n}, {style}") if c != record["caption"]]


def write_caption_variants(
    dataset_dir: Path, out_dir: Path, split: str = "train", free_form: bool = False
) -> dict[str, int]:
    """A `split` folder for training with `caption_variants` as extra items: out_dir/<split>/<style>/ has each
    image with its own caption and, as `<id>-c<k>.png` (hard links where possible), one copy per variant;
    `free_form` adds `free_form_captions` after them.

    Only for training: evaluation keeps the dataset's own holdout captions (task option `holdout_data`).
    Returns {"images": original images, "items": items written}.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    records = [
        json.loads(line)
        for line in (dataset_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    records = [r for r in records if r["split"] == split]
    if not records:
        raise EmojiDatasetError(f"{dataset_dir / 'metadata.jsonl'} has no {split!r} records")
    target = out_dir / split
    shutil.rmtree(target, ignore_errors=True)
    items = 0
    for record in records:
        source = dataset_dir / record["file_name"]
        folder = target / record["style"]
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(record["file_name"]).stem
        extra = caption_variants(record) + (free_form_captions(record) if free_form else [])
        for k, caption in enumerate(dict.fromkeys([record["caption"], *extra])):
            image = folder / (f"{stem}.png" if k == 0 else f"{stem}-c{k}.png")
            try:
                os.link(source, image)
            except OSError:  # another file system, or no hard links: copy
                shutil.copyfile(source, image)
            image.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            items += 1
    return {"images": len(records), "items": items}
