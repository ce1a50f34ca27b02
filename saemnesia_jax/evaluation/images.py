"""Pictures: PNGs of samples and labelled grids (Pillow)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

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
  top = 12 if col_labels else 0
  left = label_width if row_labels else 0
  canvas = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    r, c = divmod(i, cols)
    tile = Image.fromarray(images[i]).resize((w, h), resample)
    canvas.paste(tile, (left + pad + c * (w + pad), top + pad + r * (h + pad)))
  for r, lab in enumerate(row_labels or []):
    draw.text((2, top + pad + r * (h + pad) + h // 2 - 5), str(lab), fill="black")
  for c, lab in enumerate(col_labels or []):
    draw.text((left + pad + c * (w + pad), 0), str(lab), fill="black")
  return canvas


def save_image(path: str, img: Image.Image) -> None:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  atomic_write_bytes(path, buf.getvalue())
