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


def _blank_runs(band: np.ndarray) -> tuple[int, list[int]]:
  """(ink width, widths of the blank column runs between the first and last inked column)."""
  ink = (band < 160).any(axis=0)
  cols = np.nonzero(ink)[0]
  runs, cur = [], 0
  for v in ink[cols[0]:cols[-1] + 1]:
    if v:
      runs, cur = (runs + [cur] if cur else runs), 0
    else:
      cur += 1
  return int(cols[-1] - cols[0] + 1), runs


def _label_band(text: str) -> np.ndarray:
  g = images.grid(np.ones((1, 32, 32, 3), np.float32), 1, 1, scale=4, col_labels=[text])
  return np.asarray(g.convert("L"))[:12]  # the column-label band


def test_labels_keep_their_spaces():
  # Pillow's bare default font drew "Stripes style" with a 2 px gap between the
  # words, as narrow as the gaps between letters: it read "Stripesstyle".
  spaced_w, spaced = _blank_runs(_label_band("Stripes style"))
  joined_w, joined = _blank_runs(_label_band("Stripesstyle"))
  assert max(spaced) >= 3 and max(spaced) > max(joined), (spaced, joined)
  assert spaced_w > joined_w, (spaced_w, joined_w)


def test_a_long_row_label_is_drawn_smaller_inside_its_column():
  # Longer than label_width at the usual size: drawn smaller, not over the tiles.
  label = "Monochrome: saeuron (target)"
  g = images.grid(np.zeros((1, 32, 32, 3), np.float32), 1, 1, scale=4, row_labels=[label], label_width=150)
  a = np.asarray(g.convert("L"))
  assert (a[:, :148] < 160).any() and not (a[:, 148:150] < 160).any()
