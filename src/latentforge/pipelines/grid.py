"""Grid images: a batch in one picture (A1111's `image_grid`) and labelled X/Y/Z plots.

Follows A1111's modules/images.py: rows default to round(sqrt(n)) (`opts.n_rows = -1`), cells are the
largest image's size with smaller ones centred on a white background; plot labels use a font size of
(cell width + height) / 25 and a left band 3/4 of a cell wide, as `draw_grid_annotations` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from latentforge.errors import ParameterError

BACKGROUND = (255, 255, 255)  # A1111's default grid_background_color "#ffffff"
TEXT = (0, 0, 0)
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def grid_rows(count: int) -> int:
    """Rows A1111 gives a batch of `count` images by default: round(sqrt(count)); 2 -> 1, 3 -> 2, 7 -> 3."""
    return max(1, min(count, round(math.sqrt(count))))


def image_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """The images in one RGB picture, row by row; `rows` defaults to A1111's choice (`grid_rows`)."""
    if not images:
        raise ParameterError("image_grid: no images to put in a grid")
    if rows is not None and rows < 1:
        raise ParameterError(f"image_grid: rows must be at least 1, got {rows}")
    rows = grid_rows(len(images)) if rows is None else min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    width, height = (max(sizes) for sizes in zip(*(image.size for image in images), strict=True))
    grid = Image.new("RGB", (cols * width, rows * height), BACKGROUND)
    for i, image in enumerate(images):
        x = i % cols * width + (width - image.width) // 2
        y = i // cols * height + (height - image.height) // 2
        grid.paste(image.convert("RGB"), (x, y))
    return grid


def _wrap(text: str, font: Font, width: float) -> list[str]:
    """Lines of `text` no wider than `width`: by words, and a word wider than that by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while len(word) > 1 and font.getlength(word) > width:
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines += [line, word[:cut]] if line else [word[:cut]]
                line, word = "", word[cut:]
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                candidate = word
            line = candidate
        lines.append(line)
    return lines


def _block_height(lines: list[str], line_height: int, spacing: int) -> int:
    return len(lines) * line_height + (len(lines) - 1) * spacing if any(lines) else 0


def _draw_block(
    draw: ImageDraw.ImageDraw, lines: list[str], font: Font, centre_x: float, top: float, step: int
) -> None:
    for i, line in enumerate(lines):
        draw.text((centre_x - font.getlength(line) / 2, top + i * step), line, font=font, fill=TEXT)


def labelled_grid(
    images_by_cell: Mapping[tuple[int, ...], Image.Image],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    z_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Image.Image]:
    """An X/Y plot per Z value: X labels across the top, Y labels down the left, title and Z label above.

    `images_by_cell` maps (x, y) or (x, y, z) indices to images; a missing cell stays blank. Every cell
    takes the first cell's size (the one at the lowest z, y, x). Text uses Pillow's default font.
    """
    depth = len(z_labels) if z_labels is not None else 1
    cells: dict[tuple[int, int, int], Image.Image] = {}
    for key, image in images_by_cell.items():
        x, y, z = (*key, 0) if len(key) == 2 else key
        if not (0 <= x < len(x_labels) and 0 <= y < len(y_labels) and 0 <= z < depth):
            raise ParameterError(
                f"labelled_grid: cell {key} is outside the axes ({len(x_labels)} x, {len(y_labels)} y, "
                f"{depth} z values)"
            )
        cells[(x, y, z)] = image
    if not cells:
        raise ParameterError("labelled_grid: no images to put in a plot")
    cell_w, cell_h = cells[min(cells, key=lambda k: (k[2], k[1], k[0]))].size

    font_size = max(10, (cell_w + cell_h) // 25)
    font = ImageFont.load_default(size=font_size)
    spacing = font_size // 2
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = scratch.textbbox((0, 0), "Ag", font=font)
    line_height = int(bottom - top)
    step = line_height + spacing

    pad_left = cell_w * 3 // 4 if any(label.strip() for label in y_labels) else 0
    x_lines = [_wrap(label, font, cell_w - spacing) for label in x_labels]
    y_lines = [_wrap(label, font, pad_left - spacing) for label in y_labels] if pad_left else []
    x_band = max(_block_height(lines, line_height, spacing) for lines in x_lines)
    x_band = x_band + 2 * spacing if x_band else 0
    grid_w = pad_left + len(x_labels) * cell_w

    plots = []
    for z in range(depth):
        header = "\n".join(text for text in (title, z_labels[z] if z_labels is not None else None) if text)
        header_lines = _wrap(header, font, grid_w - 2 * spacing) if header else []
        header_band = _block_height(header_lines, line_height, spacing)
        header_band = header_band + 2 * spacing if header_band else 0
        origin_y = header_band + x_band
        plot = Image.new("RGB", (grid_w, origin_y + len(y_labels) * cell_h), BACKGROUND)
        draw = ImageDraw.Draw(plot)
        _draw_block(draw, header_lines, font, grid_w / 2, spacing - top, step)
        for x, lines in enumerate(x_lines):
            block = _block_height(lines, line_height, spacing)
            centre = pad_left + x * cell_w + cell_w / 2
            _draw_block(draw, lines, font, centre, header_band + (x_band - block) / 2 - top, step)
        for y, lines in enumerate(y_lines):
            block = _block_height(lines, line_height, spacing)
            _draw_block(
                draw, lines, font, pad_left / 2, origin_y + y * cell_h + (cell_h - block) / 2 - top, step
            )
        for (x, y, cell_z), image in cells.items():
            if cell_z == z:
                if image.size != (cell_w, cell_h):
                    image = image.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
                plot.paste(image.convert("RGB"), (pad_left + x * cell_w, origin_y + y * cell_h))
        plots.append(plot)
    return plots
