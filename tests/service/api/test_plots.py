"""The PNG figures the API serves: the image grid's layout, pixel by pixel."""

import numpy as np
import pytest

from service.api.plots import image_grid


def test_image_grid_layout():
    items = np.zeros((3, 1, 2, 2), np.float32)
    items[1] = 1.0
    grid = np.asarray(image_grid(items, columns=2, scale=1))
    # 2 columns x 2 rows of 2x2 tiles with 1-pixel borders: 5 x 7 pixels.
    assert grid.shape == (7, 7)
    assert grid[1:3, 4:6].min() == 255 and grid[1:3, 1:3].max() == 0


def expected_grid(items, columns, scale):
    """The grid built directly: black canvas, tile i at row i // columns, column
    i % columns, 1-pixel borders, then each pixel repeated `scale` times each way."""
    n, c, h, w = items.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        tile = np.rint(np.clip(items[i], 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = tile
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def test_an_rgb_grid_is_the_items_in_colour_pixel_by_pixel():
    rng = np.random.default_rng(3)
    items = rng.integers(0, 256, (5, 3, 4, 6)).astype(np.float32) / 255
    items[0, 0], items[0, 1:] = 1.0, 0.0  # a pure red tile: the channels keep their order
    grid = image_grid(items, columns=3, scale=2)
    assert grid.mode == "RGB"
    pixels = np.asarray(grid)
    assert pixels.shape == (2 * (2 * 5 + 1), 2 * (3 * 7 + 1), 3)
    np.testing.assert_array_equal(pixels, expected_grid(items, 3, 2))
    assert tuple(pixels[2, 2]) == (255, 0, 0)


def test_grey_with_and_without_a_channel_axis_and_other_channel_counts():
    rng = np.random.default_rng(4)
    items = rng.random((4, 1, 3, 3)).astype(np.float32)
    with_axis, without = image_grid(items, columns=2), image_grid(items[:, 0], columns=2)
    assert with_axis.mode == without.mode == "L"
    np.testing.assert_array_equal(np.asarray(with_axis), expected_grid(items, 2, 4)[:, :, 0])
    np.testing.assert_array_equal(np.asarray(without), np.asarray(with_axis))
    with pytest.raises(ValueError, match="1|3"):
        image_grid(np.zeros((2, 2, 3, 3), np.float32))
