"""Grid images: A1111's batch layout, and labelled X/Y/Z plots checked pixel by pixel."""

import math

import numpy as np
import pytest
from PIL import Image

from latentforge.errors import ParameterError
from latentforge.pipelines.grid import grid_rows, image_grid, labelled_grid

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (120, 60, 0), (0, 60, 120), (90, 90, 90), (250, 140, 0), (140, 0, 250)]  # fmt: skip
WHITE = (255, 255, 255)


def solid(colour, size=(16, 12)):
    return Image.new("RGB", size, colour)


def pixel(image, x, y):
    return tuple(int(c) for c in np.asarray(image)[y, x])


def dark_pixels(image, box):
    """How many pixels in box (left, top, right, bottom) are clearly not background."""
    left, top, right, bottom = (int(v) for v in box)
    region = np.asarray(image)[top:bottom, left:right].astype(int)
    return int(((255 - region).sum(axis=-1) > 150).sum())


@pytest.mark.parametrize(
    ("count", "rows"),
    [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2), (7, 3), (8, 3), (9, 3), (10, 3), (13, 4)],
)
def test_rows_as_a1111(count, rows):
    """A1111's image_grid with n_rows = -1: rows = round(sqrt(n)), columns = ceil(n / rows)."""
    assert grid_rows(count) == rows == round(math.sqrt(count))
    grid = image_grid([solid(COLOURS[i % len(COLOURS)]) for i in range(count)])
    assert grid.size == (math.ceil(count / rows) * 16, rows * 12)


def test_cells_in_row_order_with_empty_spots():
    images = [solid(c) for c in COLOURS[:5]]  # 5 -> 2 rows x 3 columns, one empty spot
    grid = image_grid(images)
    assert grid.size == (48, 24)
    for i, colour in enumerate(COLOURS[:5]):
        x, y = i % 3 * 16, i // 3 * 12
        assert pixel(grid, x, y) == colour and pixel(grid, x + 15, y + 11) == colour
    assert pixel(grid, 2 * 16 + 8, 12 + 6) == WHITE


def test_explicit_rows_and_mixed_sizes():
    grid = image_grid([solid(COLOURS[0], (16, 12)), solid(COLOURS[1], (8, 4)), solid(COLOURS[2])], rows=3)
    assert grid.size == (16, 36)
    # A1111: the cell is the largest size, a smaller image is centred in it
    assert pixel(grid, 8, 12 + 6) == COLOURS[1] and pixel(grid, 1, 12 + 1) == WHITE
    assert image_grid([solid(COLOURS[0])] * 2, rows=5).size == (16, 24)  # rows beyond the count: one column
    rgba = Image.new("RGBA", (16, 12), (10, 20, 30, 128))
    assert pixel(image_grid([rgba]), 0, 0) == (10, 20, 30)


def test_grid_errors():
    with pytest.raises(ParameterError, match="no images"):
        image_grid([])
    with pytest.raises(ParameterError, match="rows must be at least 1"):
        image_grid([solid(COLOURS[0])], rows=0)


def _plot_geometry(plot, columns, rows, cell=(64, 48)):
    """(left band width, top of the cells) from the plot's size: the cells fill the bottom right."""
    return plot.width - columns * cell[0], plot.height - rows * cell[1]


def test_labelled_xy_plot_cells_and_labels():
    x_labels, y_labels = ["CFG 3", "CFG 7"], ["Euler a", "DPM++ 2M", "LMS"]
    cells = {(x, y): solid(COLOURS[y * 2 + x], (64, 48)) for x in range(2) for y in range(3)}
    (plot,) = labelled_grid(cells, x_labels, y_labels)
    left, top = _plot_geometry(plot, 2, 3)
    assert left == 64 * 3 // 4  # A1111's left band
    assert top > 0
    for (x, y), image in cells.items():
        colour = image.getpixel((0, 0))
        cx, cy = left + x * 64, top + y * 48
        assert pixel(plot, cx, cy) == colour and pixel(plot, cx + 63, cy + 47) == colour
    for x in range(2):  # each X label is drawn above its own column
        assert dark_pixels(plot, (left + x * 64, 0, left + (x + 1) * 64, top)) > 20
    for y in range(3):  # each Y label left of its own row
        assert dark_pixels(plot, (0, top + y * 48, left, top + (y + 1) * 48)) > 20
    assert dark_pixels(plot, (0, 0, left, top)) == 0  # the corner stays empty


def test_labelled_xyz_one_image_per_z_with_title():
    cells = {(x, 0, z): solid(COLOURS[z * 2 + x], (64, 48)) for x in range(2) for z in range(2)}
    plots = labelled_grid(cells, ["a", "b"], [""], z_labels=["seed 1", "seed 2"], title="steps vs seed")
    assert len(plots) == 2
    for z, plot in enumerate(plots):
        left, top = _plot_geometry(plot, 2, 1)
        assert left == 0  # no Y labels: no left band
        for x in range(2):
            assert pixel(plot, x * 64 + 32, top + 24) == COLOURS[z * 2 + x]
        title_band = top // 2  # title and Z label sit above the X labels
        assert dark_pixels(plot, (0, 0, plot.width, title_band)) > 40
    assert np.asarray(plots[0]).shape == np.asarray(plots[1]).shape
    assert not np.array_equal(np.asarray(plots[0])[: top // 2], np.asarray(plots[1])[: top // 2])


def test_cells_take_the_first_cells_size_and_missing_cells_stay_blank():
    cells = {
        (0, 0): solid(COLOURS[0], (32, 24)),
        (1, 0): solid(COLOURS[1], (64, 48)),
        (0, 1): solid(COLOURS[2]),
    }
    (plot,) = labelled_grid(cells, ["x0", "x1"], ["y0", "y1"])
    left, top = _plot_geometry(plot, 2, 2, cell=(32, 24))
    assert pixel(plot, left + 32 + 16, top + 12) == COLOURS[1]  # resized down into a 32x24 cell
    assert pixel(plot, left + 16, top + 24 + 12) == COLOURS[2]  # resized up
    assert pixel(plot, left + 32 + 16, top + 24 + 12) == WHITE  # (1, 1) missing


def test_long_labels_wrap_inside_their_column():
    long = "a very long label that cannot fit on one line of a small cell, with a supercalifragilistic word"
    (short_plot,) = labelled_grid({(0, 0): solid(COLOURS[0], (64, 48))}, ["short"], [""])
    cells = {(0, 0): solid(COLOURS[0], (64, 48)), (1, 0): solid(COLOURS[1], (64, 48))}
    (plot,) = labelled_grid(cells, [long, ""], [""])
    _, top = _plot_geometry(plot, 2, 1)
    _, short_top = _plot_geometry(short_plot, 1, 1)
    assert top > 3 * short_top  # wrapped onto several lines
    assert dark_pixels(plot, (0, 0, 64, top)) > 100
    assert dark_pixels(plot, (64, 0, 128, top)) == 0  # nothing spills into the next column


def test_plot_errors():
    with pytest.raises(ParameterError, match=r"cell \(2, 0\) is outside"):
        labelled_grid({(2, 0): solid(COLOURS[0])}, ["a", "b"], ["c"])
    with pytest.raises(ParameterError, match="outside"):
        labelled_grid({(0, 0, 1): solid(COLOURS[0])}, ["a"], ["c"])
    with pytest.raises(ParameterError, match="no images"):
        labelled_grid({}, ["a"], ["b"])
