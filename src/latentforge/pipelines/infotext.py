"""A1111's "infotext": the generation parameters stored with an image, and the image files that carry it.

    prompt (may span lines)
    Negative prompt: negative (may span lines)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values holding a comma, colon or newline are written as JSON strings, as A1111 does, so A1111,
ComfyUI and model sites read our images and we read theirs. PNG keeps the text in a `parameters`
text chunk; JPEG and WebP in EXIF UserComment (A1111's modules/images.py `save_image_with_geninfo`).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import regex
from PIL import Image, PngImagePlugin

from latentforge.data.images import open_image
from latentforge.errors import OutputError, ParameterError

PNG_KEY = "parameters"
NEGATIVE = "Negative prompt:"
# One `Key: value` pair of the last line; a value is a JSON string or runs to the next comma
# (A1111's re_param_code in modules/infotext_utils.py).
_PARAM = regex.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# Lines sd-dynamic-prompts appends after the parameter line (its PngInfoSaver.update_pnginfo).
_TEMPLATE_KEYS = ("Template", "Negative Template")
# Image formats by file suffix or `--format` name -> Pillow's format name.
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
JPEG_QUALITY = 80  # A1111's default `jpeg_quality`, used for WebP too as A1111 does
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_JPEG_MAX_EXIF = 65533  # an APP1 segment's 16-bit length counts itself (2 bytes)


def quote(value: Any) -> str:
    """A value as written on the parameter line: JSON-quoted when it would not parse back as itself."""
    text = str(value)
    # A1111 quotes on , : and newline; a leading quote or outer whitespace would not survive parsing either.
    if not any(c in text for c in ",\n\r:") and not text.startswith('"') and text == text.strip():
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return str(json.loads(text))
        except json.JSONDecodeError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Infotext lines; parameters whose value is None are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def _is_parameter_line(line: str) -> bool:
    return len(_PARAM.findall(line)) >= 3  # A1111's rule: a parameter line has at least 3 pairs


def _split_templates(lines: list[str]) -> tuple[list[str], dict[str, str]]:
    """Lines before any trailing "Template:"/"Negative Template:" block, and the templates' text.

    A1111 itself folds these lines into the negative prompt (sd-dynamic-prompts re-parses them on paste);
    they are taken here as two keys when they follow a parameter line.
    """
    for start in range(1, len(lines)):
        if lines[start].startswith(tuple(f"{key}:" for key in _TEMPLATE_KEYS)) and _is_parameter_line(
            lines[start - 1]
        ):
            break
    else:
        return lines, {}
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines[start:]:
        key = next((k for k in reversed(_TEMPLATE_KEYS) if line.startswith(f"{k}:")), None)
        if key is not None and key not in blocks:  # a template's own lines may not open another block
            current = blocks[key] = [line[len(key) + 1 :].lstrip()]
        else:
            current.append(line)
    return lines[:start], {key: "\n".join(block) for key, block in blocks.items()}


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) from an infotext; inverse of `format_infotext`.

    Follows A1111's `parse_generation_parameters`; values keep A1111's key names and are strings.
    """
    lines, templates = _split_templates(text.strip().split("\n"))
    *lines, last = lines
    if not _is_parameter_line(last):
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            negative.append(line[len(NEGATIVE) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    params = {k.strip(): unquote(v.strip()) for k, v in _PARAM.findall(last)}
    return "\n".join(prompt), "\n".join(negative), params | templates


def dropped_text(text: str) -> list[str]:
    """Pieces of an infotext's parameter line that no `Key: value` pair holds (A1111 drops them silently),
    and the earlier value of each key written twice (the last one wins, as in A1111)."""
    lines, _ = _split_templates(text.strip().split("\n"))
    last = lines[-1]
    if not _is_parameter_line(last):
        return []
    dropped: list[str] = []
    seen: dict[str, str] = {}
    end = 0
    for match in _PARAM.finditer(last):
        gap = last[end : match.start()].strip(" ,")
        if gap:
            dropped.append(gap)
        key = match.group(1).strip()
        if key in seen:
            dropped.append(f"{key}: {seen[key]}")
        seen[key] = match.group(2).strip()
        end = match.end()
    if last[end:].strip(" ,"):
        dropped.append(last[end:].strip(" ,"))
    return dropped


# --- image files ---------------------------------------------------------------------------------


def image_format(path: str | Path, format: str | None = None) -> str:
    """Pillow's format name for `format` ("png", "jpg", "jpeg", "webp") or else the file's suffix."""
    name = (format if format is not None else Path(path).suffix.lstrip(".")).lower()
    if name not in FORMATS:
        what = f"format {format!r}" if format is not None else f"{path}: suffix {Path(path).suffix!r}"
        raise ParameterError(f"{what} cannot carry an infotext; use one of png, jpg, webp")
    return FORMATS[name]


def exif_user_comment(text: str) -> bytes:
    """An EXIF block (APP1 payload) holding only UserComment = `text`, as A1111 writes it.

    A1111 stores `piexif.helper.UserComment.dump(text, encoding="unicode")`: b"UNICODE\\0" then UTF-16BE,
    in a big-endian TIFF structure. Built by hand (TIFF 6.0 section 2, Exif 2.32 section 4.6.5) because
    Pillow's `Image.Exif` types an unknown bytes tag as BYTE, not UNDEFINED, and piexif (which A1111
    reads with) then returns a tuple that A1111 cannot decode.
    """
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    exif_ifd = 8 + 2 + 12 + 4  # header, then IFD0: entry count, one entry, next-IFD offset
    data = exif_ifd + 2 + 12 + 4
    ifd0 = struct.pack(">HHHIII", 1, _EXIF_IFD, 4, 1, exif_ifd, 0)  # LONG pointer to the Exif IFD
    exif = struct.pack(">HHHIII", 1, _USER_COMMENT, 7, len(comment), data, 0)  # UNDEFINED, data after
    return b"Exif\0\0" + b"MM\0\x2a" + struct.pack(">I", 8) + ifd0 + exif + comment


def decode_user_comment(raw: bytes, big_endian: bool = True) -> str:
    """Text of an EXIF UserComment: its 8-byte character code, then the text (Exif 2.32 table 9).

    "UNICODE" is UTF-16 in the file's byte order by the standard; A1111 (piexif) always writes big-endian,
    so the order is taken from where the zero bytes of ASCII text fall, else from the file. "ASCII" text
    is decoded as UTF-8 (tools put UTF-8 there); no known code means raw text, as A1111 falls back to.
    """
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", "replace")
        else:
            even, odd = body[0::2].count(0), body[1::2].count(0)
            big = even > odd or (even == odd and big_endian)
            text = body.decode("utf-16-be" if big else "utf-16-le", "replace")
    elif code == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", "replace")
    elif code in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", "replace")
    else:
        text = raw.decode("utf-8", "replace")
    return text.rstrip("\0")


def _exif_comment(exif_bytes: bytes) -> str | None:
    exif = Image.Exif()
    try:
        with warnings.catch_warnings():  # Pillow warns "Corrupt EXIF data"; malformed EXIF counts as absent
            warnings.simplefilter("ignore", UserWarning)
            exif.load(exif_bytes)
            raw = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (OSError, SyntaxError, ValueError, KeyError, struct.error):
        return None
    if isinstance(raw, tuple):  # written with type BYTE
        raw = bytes(raw)
    if isinstance(raw, str):  # written with type ASCII
        return raw.rstrip("\0") or None
    if not isinstance(raw, bytes):
        return None
    return decode_user_comment(raw, big_endian=exif.endian != "<") or None


def _infotext_of(image: Image.Image) -> str | None:
    if image.format == "PNG" and PNG_KEY not in image.info and "exif" not in image.info:
        image.load()  # text or eXIf chunks after the pixel data are only seen once the pixels are read
    text = image.info.get(PNG_KEY)
    exif = image.info.get("exif")
    comment = _exif_comment(exif) if isinstance(exif, bytes) else None
    if comment:  # A1111's read_info_from_image: a non-empty EXIF comment wins over the text chunk
        return comment
    if isinstance(text, str) and text:
        return text
    return _novelai_infotext(image) if image.info.get("Software") == "NovelAI" else None


# NovelAI's sampler names -> A1111's (A1111 maps only its own aliases and turns the rest into "Euler a";
# the rest are passed through here, so an unknown one is reported rather than replaced).
_NOVELAI_SAMPLERS = {
    "k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS", "k_heun": "Heun", "k_dpm_2": "DPM2",
    "k_dpm_2_ancestral": "DPM2 a", "k_dpmpp_2s_ancestral": "DPM++ 2S a", "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE", "k_dpm_fast": "DPM fast", "k_dpm_adaptive": "DPM adaptive", "ddim": "DDIM",
    "plms": "PLMS",
}  # fmt: skip
_NOVELAI_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential"}


def _novelai_infotext(image: Image.Image) -> str | None:
    """A NovelAI PNG's Description + Comment JSON as an infotext, the way A1111's read_info_from_image
    converts it (its fixed Clip skip 2 and ENSD 31337 included); None when the JSON is not NovelAI's."""
    try:
        info = json.loads(str(image.info.get("Comment", "")))
        sampler = str(info["sampler"])
        params = {
            "Steps": info["steps"],
            "Sampler": _NOVELAI_SAMPLERS.get(sampler, sampler),
            "Schedule type": _NOVELAI_SCHEDULES.get(str(info.get("noise_schedule"))),
            "CFG scale": info["scale"],
            "Seed": info["seed"],
            "Size": f"{image.width}x{image.height}",
            "Clip skip": 2,
            "ENSD": 31337,
        }
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return format_infotext(str(image.info.get("Description", "")), str(info.get("uc", "")), params)


def read_infotext(source: str | Path | Image.Image) -> str | None:
    """The infotext of an image (PNG text chunk, or EXIF UserComment in JPEG/WebP/PNG), None if it has none.

    A file that is missing or not an image raises `ImageLoadError` naming it.
    """
    if isinstance(source, Image.Image):
        return _infotext_of(source)
    with open_image(Path(source), failure="unreadable image") as image:
        return _infotext_of(image)


def _encodable(image: Image.Image, fmt: str) -> Image.Image:
    """The image in a mode `fmt` stores: JPEG has no alpha (dropped, as A1111 does); WebP keeps it."""
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        return image.convert("RGB")
    if fmt == "WEBP" and image.mode not in ("RGB", "RGBA"):
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image


def save_image(
    image: Image.Image,
    path: str | Path,
    infotext: str | None,
    format: str | None = None,
    *,
    quality: int = JPEG_QUALITY,
) -> Path:
    """Write `image` with its infotext as PNG, JPEG or WebP (`format`, else the suffix); returns the path.

    Written to a hidden file in the same folder, then renamed, so no partial image is ever left under
    `path`; an existing file is never overwritten (the caller picks a free name).
    """
    path = Path(path)
    fmt = image_format(path, format)
    options: dict[str, Any] = {}
    if fmt == "PNG":
        if infotext is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text(PNG_KEY, infotext)  # tEXt, or iTXt (UTF-8) when not Latin-1
            options["pnginfo"] = info
    else:
        image = _encodable(image, fmt)
        options["quality"] = quality
        if infotext is not None:
            options["exif"] = exif_user_comment(infotext)
            if fmt == "JPEG" and len(options["exif"]) > _JPEG_MAX_EXIF:
                raise OutputError(
                    f"{path}: the infotext ({len(options['exif'])} bytes as EXIF) does not fit JPEG's "
                    f"{_JPEG_MAX_EXIF}-byte EXIF segment; save as png or webp"
                )
    if path.exists():
        raise OutputError(f"{path} already exists; images are never overwritten: choose another name")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(temporary, "xb") as file:  # "x": never clobbers; default permissions (unlike mkstemp)
            image.save(file, format=fmt, **options)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the image: {error.strerror or error}") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def save_png(image: Image.Image, path: str | Path, infotext: str) -> None:
    """`save_image` as PNG (the name older call sites use)."""
    save_image(image, path, infotext, format="png")
