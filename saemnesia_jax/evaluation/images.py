"""Pictures: PNGs of samples and labelled grids (Pillow)."""
from __future__ import annotations

import functools
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from saemnesia_jax.runtime.io_utils import atomic_write_bytes


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [0, 1] -> uint8."""
  return (np.clip(np.asarray(images, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  """Writes one (H, W, 3) image atomically, nearest-upscaled by ``scale``."""
  img = Image.fromarray(to_uint8(image) if image.dtype != np.uint8 else image)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  atomic_write_bytes(path, buf.getvalue())


GRID_TILE_PX = 128  # the side of one grid tile, at any sampling resolution


def tile_scale(side: int, tile_px: int = GRID_TILE_PX) -> float:
  """The ``grid`` scale that draws an image of ``side`` pixels as a ``tile_px`` tile:
  4 for CanvasMini's 32 px, 0.25 for SD's 512 px (not 4 at every size: a
  2,048 px tile per image made a 10,402 x 24,614 px grid at 512 px)."""
  return tile_px / max(int(side), 1)


LABEL_BAND_PX = 12  # the height of the column-label band above a grid
LABEL_FONT_PX = 11  # labels' font size; smaller where a label would not fit its room
_MIN_FONT_PX = 7


@functools.lru_cache(maxsize=None)
def label_font(size: int = LABEL_FONT_PX) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
  """DejaVu Sans (shipped with matplotlib) at ``size`` px; Pillow's own
  scalable default font at that size if the file is missing. Not Pillow's bare
  ``load_default()``, which labels used before: at its 10 px the space between
  two words was 2 px, as narrow as between two letters, so "Stripes style"
  read "Stripesstyle"."""
  try:
    import matplotlib  # deferred: matplotlib only to find its font
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
  except (ImportError, OSError):
    pass
  try:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def _fitting_font(labels: Sequence[str], room: int):
  """The largest label font, at most LABEL_FONT_PX, in which every label is at
  most ``room`` px wide (the smallest tried when none fits)."""
  for size in range(LABEL_FONT_PX, _MIN_FONT_PX - 1, -1):
    font = label_font(size)
    if not isinstance(font, ImageFont.FreeTypeFont) or all(font.getlength(lab) <= room for lab in labels):
      return font
  return font


def grid(images: np.ndarray, rows: int, cols: int, scale: float = 1, pad: int = 2,
         row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
         label_width: int = 0) -> Image.Image:
  """(rows*cols, H, W, 3) images -> one labelled grid image (row-major);
  ``scale`` resizes every tile (nearest when enlarging, box filter when shrinking)."""
  images = to_uint8(images) if images.dtype != np.uint8 else images
  n, h, w, _ = images.shape
  if n > rows * cols:
    raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
  h, w = max(1, round(h * scale)), max(1, round(w * scale))
  resample = Image.NEAREST if scale >= 1 else Image.BOX
  top = LABEL_BAND_PX if col_labels else 0
  left = label_width if row_labels else 0
  canvas = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, c = divmod(i, cols)
    tile = Image.fromarray(images[i]).resize((w, h), resample)
    canvas.paste(tile, (left + pad + c * (w + pad), top + pad + r * (h + pad)))
  if row_labels:
    labels = [str(lab) for lab in row_labels]
    font = _fitting_font(labels, left - 4)
    for r, lab in enumerate(labels):  # vertically centred on its row
      y = top + pad + r * (h + pad) + h // 2
      if isinstance(font, ImageFont.FreeTypeFont):
        draw.text((2, y), lab, fill="black", font=font, anchor="lm")
      else:  # a bitmap font (Pillow without FreeType) takes no anchor
        draw.text((2, y - 5), lab, fill="black", font=font)
  if col_labels:
    labels = [str(lab) for lab in col_labels]
    font = _fitting_font(labels, w + pad)
    for c, lab in enumerate(labels):
      x = left + pad + c * (w + pad)
      if isinstance(font, ImageFont.FreeTypeFont):
        # On one baseline, the ink of capitals to descenders centred in the band.
        _, ink_top, _, ink_bottom = font.getbbox("Hg", anchor="ls")
        draw.text((x, (top - (ink_bottom - ink_top)) // 2 - ink_top), lab, fill="black", font=font, anchor="ls")
      else:
        draw.text((x, 0), lab, fill="black", font=font)
  return canvas


def save_image(path: str, img: Image.Image) -> None:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  atomic_write_bytes(path, buf.getvalue())
