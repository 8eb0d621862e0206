"""The PNG figures the API serves: the image grid's layout, pixel by pixel."""

import numpy as np

from service.api.plots import image_grid


def test_image_grid_layout():
    items = np.zeros((3, 1, 2, 2), np.float32)
    items[1] = 1.0
    grid = np.asarray(image_grid(items, columns=2, scale=1))
    # 2 columns x 2 rows of 2x2 tiles with 1-pixel borders: 5 x 7 pixels.
    assert grid.shape == (7, 7)
    assert grid[1:3, 4:6].min() == 255 and grid[1:3, 1:3].max() == 0
