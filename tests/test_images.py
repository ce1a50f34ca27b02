"""Grids: one tile size at every sampling resolution."""
import numpy as np

from saemnesia_jax.evaluation import images


def test_grid_tiles_are_the_same_size_at_any_resolution():
  # The erasure grid's shape at SD v1.5: 10 rows x 5 columns of 512 px images.
  rows, cols, label = 10, 5, 150
  for side in (32, 512):
    imgs = np.random.default_rng(0).random((rows * cols, side, side, 3), np.float32)
    g = images.grid(imgs, rows, cols, scale=images.tile_scale(side), row_labels=["r"] * rows,
                    col_labels=["c"] * cols, label_width=label)
    tile = images.GRID_TILE_PX
    assert g.size == (label + cols * (tile + 2) + 2, 12 + rows * (tile + 2) + 2), (side, g.size)
  assert images.tile_scale(32) == 4 and images.tile_scale(512) == 0.25
