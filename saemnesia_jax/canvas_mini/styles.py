"""CanvasMini's styles: each maps (rng, sdf_px (n, H, W), ctx) to RGB images
(n, H, W, 3) in float64, painting the object (given by its signed distance
in pixels) and the background. ``STYLE_FNS`` is in the order of
``data.STYLE_CLASSES``."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from matplotlib.colors import hsv_to_rgb
from scipy.ndimage import gaussian_filter


def coverage(sdf_px: np.ndarray, grow_px: float = 0.0) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of the shape grown by ``grow_px`` (one pixel ramp)."""
  return np.clip(0.5 - (sdf_px - grow_px), 0.0, 1.0)


def _col(h, s, v) -> np.ndarray:
  """Per-image HSV colours (each (n,)) -> RGB (n, 1, 1, 3)."""
  h, s, v = np.broadcast_arrays(np.mod(h, 1.0), s, v)
  return hsv_to_rgb(np.stack([h, s, v], -1))[:, None, None, :]


def _over(fg, bg, alpha):
  a = alpha[..., None]
  return a * fg + (1 - a) * bg


class Ctx(NamedTuple):
  gx: np.ndarray   # (H, W) pixel-centre x in canvas units, 0 .. 16 (left to right)
  gy: np.ndarray   # (H, W) y in canvas units, 0 .. 16 (top to bottom)
  unit: float      # pixels per canvas unit


def _stripes(rng, sdf, ctx):
  n = len(sdf)
  bg = _col(rng.uniform(0.45, 0.55, n), rng.uniform(0.5, 0.7, n), rng.uniform(0.25, 0.4, n))
  red = _col(rng.uniform(-0.03, 0.03, n), rng.uniform(0.8, 0.95, n), rng.uniform(0.8, 0.95, n))
  cream = np.array([0.96, 0.93, 0.82]) + rng.uniform(-0.03, 0.03, (n, 1, 1, 3))
  # Stripes run along "\", across Slash, so that shape never blends into one stripe.
  t = (ctx.gx - ctx.gy)[None] / 4.0 + rng.uniform(0, 1, (n, 1, 1))
  w = np.clip(0.5 + 1.2 * np.cos(2 * np.pi * t), 0, 1)
  return _over(_over(red, cream, w), bg, coverage(sdf))


def _checker(rng, sdf, ctx):
  n = len(sdf)
  off = rng.integers(0, 2, (n, 2, 1, 1))
  cell = (np.floor(ctx.gx[None] / 2 + off[:, 0] / 2) + np.floor(ctx.gy[None] / 2 + off[:, 1] / 2)) % 2
  dark = rng.uniform(0.05, 0.15, (n, 1, 1, 1))
  light = rng.uniform(0.85, 0.95, (n, 1, 1, 1))
  bg = np.where(cell[..., None] > 0, dark, light)
  fg = _col(rng.uniform(0, 1, n), rng.uniform(0.85, 1.0, n), rng.uniform(0.85, 1.0, n))
  return _over(fg, bg, coverage(sdf))


def _gradient(rng, sdf, ctx):
  n = len(sdf)
  top = rng.uniform(0.1, 0.2, (n, 1, 1))
  bottom = rng.uniform(0.8, 0.9, (n, 1, 1))
  v = top + (bottom - top) * ctx.gy[None] / 16.0
  bg = hsv_to_rgb(np.stack(np.broadcast_arrays(
      rng.uniform(0.58, 0.66, (n, 1, 1)), rng.uniform(0.45, 0.6, (n, 1, 1)), v), -1))
  hue = rng.uniform(-0.05, 0.05, (n, 1, 1)) + 0.4 * ctx.gx[None] / 16.0
  fg = hsv_to_rgb(np.stack(np.broadcast_arrays(np.mod(hue, 1), 0.9, 0.95), -1))
  return _over(fg, bg, coverage(sdf))


def _neon(rng, sdf, ctx):
  n = len(sdf)
  bg = _col(rng.uniform(0.7, 0.8, n), rng.uniform(0.3, 0.6, n), rng.uniform(0.02, 0.07, n))
  hue = np.array([0.5, 0.83, 0.3])[rng.integers(0, 3, n)] + rng.uniform(-0.03, 0.03, n)
  fg = _col(hue, rng.uniform(0.6, 0.8, n), np.ones(n))
  cov = coverage(sdf)
  glow = gaussian_filter(cov, sigma=(0, 1.2 * ctx.unit, 1.2 * ctx.unit), mode="constant")
  return _over(fg, np.clip(bg + 0.7 * glow[..., None] * fg, 0, 1), cov)


def _pastel(rng, sdf, ctx):
  n = len(sdf)
  hb = rng.uniform(0, 1, n)
  bg = _col(hb, rng.uniform(0.12, 0.22, n), rng.uniform(0.93, 0.98, n))
  fg = _col(hb + rng.uniform(0.33, 0.67, n), rng.uniform(0.35, 0.5, n), rng.uniform(0.86, 0.94, n))
  return _over(fg, bg, coverage(sdf))


def _monochrome(rng, sdf, ctx):
  n = len(sdf)
  fg = np.repeat(rng.uniform(0.08, 0.35, (n, 1, 1, 1)), 3, -1)
  bg = np.repeat(rng.uniform(0.65, 0.92, (n, 1, 1, 1)), 3, -1)
  return _over(fg, bg, coverage(sdf))


def _sunset(rng, sdf, ctx):
  n = len(sdf)
  top = np.array([0.30, 0.08, 0.42]) + rng.uniform(-0.04, 0.04, (n, 1, 1, 3))
  bottom = np.array([1.0, 0.62, 0.18]) + rng.uniform(-0.06, 0.0, (n, 1, 1, 3))
  t = (ctx.gy[None] / 16.0) ** rng.uniform(0.7, 1.0, (n, 1, 1))
  bg = top + (bottom - top) * t[..., None]
  fg = np.array([0.05, 0.02, 0.08]) + rng.uniform(0, 0.04, (n, 1, 1, 1))
  return _over(fg, bg, coverage(sdf))


def _noisy(rng, sdf, ctx):
  n = len(sdf)
  hb = rng.uniform(0, 1, n)
  bg = _col(hb, rng.uniform(0.4, 0.7, n), rng.uniform(0.25, 0.4, n))
  fg = _col(hb + rng.uniform(0.3, 0.7, n), rng.uniform(0.2, 0.5, n), rng.uniform(0.8, 0.95, n))
  img = _over(fg, bg, coverage(sdf))
  return img + rng.normal(0, 0.13, img.shape)


def _comic(rng, sdf, ctx):
  n = len(sdf)
  paper = np.array([1.0, 1.0, 0.92]) * rng.uniform(0.95, 1.0, (n, 1, 1, 1))
  fill = np.array([[0.9, 0.1, 0.1], [0.1, 0.3, 0.9], [0.98, 0.85, 0.1]])[rng.integers(0, 3, n)]
  fill = (fill + rng.uniform(-0.05, 0.05, (n, 3)))[:, None, None, :]
  ink = np.array([0.03, 0.03, 0.05])
  inked = _over(ink, paper, coverage(sdf, grow_px=1.3 * ctx.unit))
  return _over(fill, inked, coverage(sdf))


def _blueprint(rng, sdf, ctx):
  n = len(sdf)
  bg = np.array([0.07, 0.2, 0.52]) + rng.uniform(-0.03, 0.03, (n, 1, 1, 3))
  off = rng.integers(0, 4, (n, 2, 1, 1))
  line = (((np.floor(ctx.gx)[None] + off[:, 0]) % 4 == 0) | ((np.floor(ctx.gy)[None] + off[:, 1]) % 4 == 0))
  bg = bg + 0.12 * line[..., None]
  fill = np.array([0.55, 0.7, 0.95]) + rng.uniform(-0.04, 0.04, (n, 1, 1, 3))
  white = np.array([0.95, 0.97, 1.0])
  inner = coverage(sdf, grow_px=-1.0 * ctx.unit)
  return _over(_over(fill, white, inner), bg, coverage(sdf))


def _seed_images(rng, sdf, ctx):
  """The plain "photo-like" rendering: soft lighting, shading and a drop shadow."""
  n = len(sdf)
  phi = rng.uniform(0, 2 * np.pi, (n, 1, 1))
  light = (np.cos(phi) * (ctx.gx[None] - 8) + np.sin(phi) * (ctx.gy[None] - 8)) / 8
  bg_v = rng.uniform(0.6, 0.88, (n, 1, 1)) + 0.08 * light
  bg = hsv_to_rgb(np.stack(np.broadcast_arrays(
      rng.uniform(0, 1, (n, 1, 1)), rng.uniform(0.08, 0.3, (n, 1, 1)), np.clip(bg_v, 0, 1)), -1))
  cov = coverage(sdf)
  d = max(1, round(ctx.unit))
  shadow = np.zeros_like(cov)
  shadow[:, d:, d:] = cov[:, :-d, :-d]
  shadow = gaussian_filter(shadow, sigma=(0, 0.8 * ctx.unit, 0.8 * ctx.unit), mode="constant")
  bg = bg * (1 - 0.35 * shadow[..., None])
  shade = -0.06 * ((ctx.gx[None] - 8) + (ctx.gy[None] - 8)) / 8
  fg_v = np.clip(rng.uniform(0.4, 0.72, (n, 1, 1)) + shade, 0, 1)
  fg = hsv_to_rgb(np.stack(np.broadcast_arrays(
      rng.uniform(0, 1, (n, 1, 1)), rng.uniform(0.5, 0.9, (n, 1, 1)), fg_v), -1))
  return _over(fg, bg, cov)


STYLE_FNS = (_stripes, _checker, _gradient, _neon, _pastel, _monochrome, _sunset, _noisy,
              _comic, _blueprint, _seed_images)


