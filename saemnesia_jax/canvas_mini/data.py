"""CanvasMini: the UnlearnCanvas benchmark in miniature (docs/method.md section 7).

Procedurally drawn images of ``N_OBJECTS`` objects (bold shapes) in
``N_STYLES`` styles (palettes, textures, line treatments) plus a plain
"photo-like" rendering, ``NO_STYLE`` (the analogue of UnlearnCanvas'
Seed_Images).  Images are float32 RGB in [0, 1], NHWC, 16x16 by default.

Concept ids:
  object ids: ``0 .. N_OBJECTS-1`` in the order of ``OBJECTS``;
  style ids:  ``0 .. N_STYLES-1`` in the order of ``STYLES``, and
              ``NO_STYLE_ID == N_STYLES`` for the plain rendering, so the style
              classifier has ``N_STYLE_CLASSES == N_STYLES + 1`` classes in the
              order of ``STYLE_CLASSES``.

Prompts follow UnlearnCanvas: "A {object} image in {style} style." for a
style, and for no style one of ``ANCHOR_TEMPLATES`` ("A {object} image.", ...).
``prompt_words`` is the one tokenisation rule: lower-case, drop the final
period, split on white space.  Every name is one word (or one CamelCase token)
so ``vocabulary()`` stays small.

Geometry is defined on a 16x16 "canvas unit" grid; at other image sizes every
length (shapes, jitter, texture periods) scales with ``image_size / 16``.
Everything is vectorised numpy and deterministic from a seed (a
``numpy.random.Generator``).
"""
from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter

from saemnesia_jax.canvas_mini import styles

# Bumped whenever a change makes the same seed draw different images; the
# classifier assets record it so that stale assets are detected.
GENERATOR_VERSION = 1

# Objects: bold silhouettes that survive at 16 px.  A first attempt
# (an earlier miniature, measured) showed that a small diffusion model learns thin or pointed
# shapes (triangle, star, heart, arrow, cross, diamond) slowly, and filled
# disks and squares fast.  So every object here is a union / difference of
# disks and axis-aligned boxes with strokes at least 3-4 px thick and holes at
# least 6 px wide:
#   Disk (filled, r 5) vs Square (filled, 9.5 px): round vs corners.
#   Ring / Frame: the same two with a 6 px hole (3 px strokes).
#   Beam / Pillar: one 4.5 x 12.5 px bar, horizontal / vertical.  Orientation
#     is their identity, which is why rotation jitter is only a few degrees.
#   Plus / Tee / Corner: two 4 px bars crossing at the centre / at the top /
#     at the bottom-left corner ("+", "T", "L").
#   Slash: a 4.5 px bar on the rising diagonal ("/"), the only oblique shape.
#     (A half disk was tried here: at 16 px it differed from Beam by only 22
#     px, so it was replaced.)
# Each pair differs by at least ~15 px of its 256 (tested).
OBJECTS: tuple[str, ...] = (
    "Disk", "Square", "Ring", "Frame", "Beam", "Pillar", "Plus", "Tee", "Corner", "Slash")

# Styles: each changes the colours / texture of both shape and background with
# features 2-4 px wide or global palettes, so they survive at 16 px and under
# mild blur; every style keeps a clear shape / background contrast.
STYLES: tuple[str, ...] = (
    "Stripes",     # red / cream stripes along the falling diagonal (period 4 px) on a dark teal ground
    "Checker",     # saturated flat shape on a black / white 2 px checkerboard
    "Gradient",    # red->green horizontal rainbow shape on a dark-to-light blue ramp
    "Neon",        # glowing cyan / magenta / lime shape on near-black
    "Pastel",      # light desaturated shape on a lighter pastel ground
    "Monochrome",  # dark grey shape on light grey, exactly R = G = B
    "Sunset",      # black silhouette on a purple (top) to orange (bottom) sky
    "Noisy",       # light shape on a dark ground with strong per-pixel grain
    "Comic",       # flat primary colour with a thick black outline on paper white
    "Blueprint",   # pale blue shape with white inner outline on blue with a grid
)
NO_STYLE = "SeedImages"
# The optional no-object class of an object judge (classifiers.py,
# ``classifier.no_object_share``): images that hold no shape, such as a style's
# background alone or noise. It is a judge's answer, never a prompt's concept.
NO_OBJECT = "NoObject"
N_OBJECTS = len(OBJECTS)
N_STYLES = len(STYLES)
NO_STYLE_ID = N_STYLES
STYLE_CLASSES: tuple[str, ...] = STYLES + (NO_STYLE,)
N_STYLE_CLASSES = len(STYLE_CLASSES)

STYLE_TEMPLATE = "A {object} image in {style} style."
ANCHOR_TEMPLATES: tuple[str, ...] = (
    "A {object} image.", "An image of a {object}.", "A photo of a {object}.")


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """How images are drawn; lengths are in canvas units (1 unit = image_size/16 px).

  Attributes:
    image_size: height = width in pixels.
    position_jitter: maximum shift of the shape centre per axis, canvas units.
    scale_jitter: relative size range, the scale is uniform in [1 - s, 1 + s].
    rotation_jitter_deg: maximum rotation in degrees (small: Beam vs Pillar,
      Tee and Corner are defined by their orientation).
  """
  image_size: int = 16
  position_jitter: float = 1.0
  scale_jitter: float = 0.12
  rotation_jitter_deg: float = 5.0

  def __post_init__(self):
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8 pixels, got {self.image_size}")
    if not 0 <= self.scale_jitter < 0.5:
      raise ValueError(f"scale_jitter must be in [0, 0.5), got {self.scale_jitter}")
    if self.position_jitter < 0 or self.rotation_jitter_deg < 0:
      raise ValueError("position_jitter and rotation_jitter_deg must be >= 0")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> "RenderSpec":
    """Builds the spec from a config's ``data`` section (other keys are ignored)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: cfg[n] for n in names if n in cfg})


# ---------------------------------------------------------------- concepts


def object_id(obj: int | str) -> int:
  """Object id of a name (case-insensitive) or an id; raises a ValueError listing the valid ones."""
  return _lookup(obj, OBJECTS, "object")


def style_id(style: int | str) -> int:
  """Style id of a name (case-insensitive, ``NO_STYLE`` included) or an id."""
  return _lookup(style, STYLE_CLASSES, "style")


def _lookup(key: int | str, names: Sequence[str], kind: str) -> int:
  valid = ", ".join(f"{i}={n}" for i, n in enumerate(names))
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    if 0 <= int(key) < len(names):
      return int(key)
    raise ValueError(f"unknown {kind} id {key!r}; valid {kind}s are: {valid}")
  if isinstance(key, str):
    lower = [n.lower() for n in names]
    if key.lower() in lower:
      return lower.index(key.lower())
  raise ValueError(f"unknown {kind} {key!r}; valid {kind}s are: {valid}")


def _check_ids(ids: Any, n: int, kind: str, names: Sequence[str]) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{kind} ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
  bad = ids[(ids < 0) | (ids >= n)]
  if bad.size:
    valid = ", ".join(f"{i}={nm}" for i, nm in enumerate(names))
    raise ValueError(f"unknown {kind} ids {sorted(set(bad.tolist()))[:5]}; valid {kind}s are: {valid}")
  return ids.astype(np.int32)


# ------------------------------------------------------------------ prompts


class PromptSpec(NamedTuple):
  prompt: str
  object_id: int
  style_id: int  # NO_STYLE_ID for the anchor prompts
  variant: int   # index into ANCHOR_TEMPLATES for NO_STYLE, 0 otherwise


def prompt(obj: int | str, style: int | str, variant: int = 0) -> str:
  """The UnlearnCanvas prompt for (object, style); ``variant`` picks an anchor prompt for NO_STYLE."""
  o, s = object_id(obj), style_id(style)
  if s == NO_STYLE_ID:
    if not 0 <= variant < len(ANCHOR_TEMPLATES):
      raise ValueError(f"anchor variant must be in 0..{len(ANCHOR_TEMPLATES) - 1}, got {variant}: "
                       f"{list(ANCHOR_TEMPLATES)}")
    return ANCHOR_TEMPLATES[variant].format(object=OBJECTS[o])
  if variant != 0:
    raise ValueError(f"styled prompts have one variant (0), got {variant}; anchor variants "
                     f"exist only for style {NO_STYLE!r} (id {NO_STYLE_ID})")
  return STYLE_TEMPLATE.format(object=OBJECTS[o], style=STYLES[s])


def prompt_grid() -> list[PromptSpec]:
  """Every object x style prompt (object-major), then every object's anchor prompts."""
  grid = [PromptSpec(prompt(o, s), o, s, 0) for o in range(N_OBJECTS) for s in range(N_STYLES)]
  grid += [PromptSpec(prompt(o, NO_STYLE_ID, v), o, NO_STYLE_ID, v)
           for o in range(N_OBJECTS) for v in range(len(ANCHOR_TEMPLATES))]
  return grid


def prompt_words(text: str) -> list[str]:
  """The tokenisation rule for prompts: lower-case, strip one final period, split on white space."""
  text = text.strip().lower()
  if text.endswith("."):
    text = text[:-1]
  return text.split()


def vocabulary() -> list[str]:
  """Sorted list of every word of every prompt in ``prompt_grid()`` (after ``prompt_words``)."""
  return sorted({w for p in prompt_grid() for w in prompt_words(p.prompt)})


# ----------------------------------------------------------------- geometry
# Signed distance functions in canvas units (negative inside), on arrays
# (n, H, W) of shape-frame coordinates; y points down.


def _box(x, y, cx, cy, hx, hy):
  dx, dy = np.abs(x - cx) - hx, np.abs(y - cy) - hy
  return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)


def _disk(x, y, cx, cy, r):
  return np.hypot(x - cx, y - cy) - r


_SDF = {
    "Disk": lambda x, y: _disk(x, y, 0, 0, 5.0),
    "Square": lambda x, y: _box(x, y, 0, 0, 4.75, 4.75),
    "Ring": lambda x, y: np.maximum(_disk(x, y, 0, 0, 6.0), -_disk(x, y, 0, 0, 3.0)),
    "Frame": lambda x, y: np.maximum(_box(x, y, 0, 0, 6.0, 6.0), -_box(x, y, 0, 0, 3.0, 3.0)),
    "Beam": lambda x, y: _box(x, y, 0, 0, 6.25, 2.25),
    "Pillar": lambda x, y: _box(x, y, 0, 0, 2.25, 6.25),
    "Plus": lambda x, y: np.minimum(_box(x, y, 0, 0, 6.25, 2.0), _box(x, y, 0, 0, 2.0, 6.25)),
    "Tee": lambda x, y: np.minimum(_box(x, y, 0, -4.0, 6.25, 2.0), _box(x, y, 0, 1.75, 2.0, 4.25)),
    "Corner": lambda x, y: np.minimum(_box(x, y, -4.0, 0, 2.0, 6.25), _box(x, y, 0, 4.25, 6.0, 2.0)),
    # Rotated box: u runs along "/" (up-right, y points down), v across it.
    "Slash": lambda x, y: _box((x - y) / np.sqrt(2), (x + y) / np.sqrt(2), 0, 0, 6.75, 2.25),
}
assert tuple(_SDF) == OBJECTS


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in canvas units, centred on the image: (x, y), each (H, W)."""
  c = (np.arange(size, dtype=np.float64) + 0.5 - size / 2) * (16.0 / size)
  return np.meshgrid(c, c)


def _signed_distance(object_ids, shift, scale, angle, size) -> np.ndarray:
  """Signed distance to each image's shape in *pixels*, (n, H, W)."""
  gx, gy = _pixel_grid(size)
  px = gx[None] - shift[:, 0, None, None]
  py = gy[None] - shift[:, 1, None, None]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  qx = (cos * px + sin * py) / scale[:, None, None]
  qy = (-sin * px + cos * py) / scale[:, None, None]
  sdf = np.empty(qx.shape, np.float64)
  for k, name in enumerate(OBJECTS):
    idx = np.flatnonzero(object_ids == k)
    if idx.size:
      sdf[idx] = _SDF[name](qx[idx], qy[idx])
  return sdf * scale[:, None, None] * (size / 16.0)


def silhouettes(spec: RenderSpec = RenderSpec()) -> np.ndarray:
  """Coverage of every object without jitter, (N_OBJECTS, H, W) float32 in [0, 1]."""
  n = N_OBJECTS
  sdf = _signed_distance(np.arange(n), np.zeros((n, 2)), np.ones(n), np.zeros(n), spec.image_size)
  return styles.coverage(sdf).astype(np.float32)


assert len(styles.STYLE_FNS) == N_STYLE_CLASSES


# ---------------------------------------------------------------- rendering


def render(object_ids: Any, style_ids: Any, seed: int | np.random.SeedSequence,
           spec: RenderSpec = RenderSpec(), return_masks: bool = False):
  """Draws one image per (object_ids[i], style_ids[i]).

  Args:
    object_ids: (n,) ints in [0, N_OBJECTS).
    style_ids: (n,) ints in [0, N_STYLE_CLASSES); NO_STYLE_ID is the plain rendering.
    seed: seed of the numpy Generator that draws every random choice.
    spec: image size and jitter.
    return_masks: also return the shape coverage (n, H, W) in [0, 1].

  Returns:
    images (n, H, W, 3) float32 in [0, 1] (and the masks if asked).
  """
  obj = _check_ids(object_ids, N_OBJECTS, "object", OBJECTS)
  sty = _check_ids(style_ids, N_STYLE_CLASSES, "style", STYLE_CLASSES)
  if obj.shape != sty.shape:
    raise ValueError(f"object_ids {obj.shape} and style_ids {sty.shape} must have the same length")
  rng = np.random.default_rng(seed)
  n, size = len(obj), spec.image_size
  shift = rng.uniform(-spec.position_jitter, spec.position_jitter, (n, 2))
  scale = rng.uniform(1 - spec.scale_jitter, 1 + spec.scale_jitter, n)
  angle = np.deg2rad(rng.uniform(-spec.rotation_jitter_deg, spec.rotation_jitter_deg, n))
  sdf = _signed_distance(obj, shift, scale, angle, size)
  gx, gy = _pixel_grid(size)
  ctx = styles.Ctx(gx + 8.0, gy + 8.0, size / 16.0)
  images = np.empty((n, size, size, 3), np.float32)
  for s, fn in enumerate(styles.STYLE_FNS):
    idx = np.flatnonzero(sty == s)
    if idx.size:
      images[idx] = np.clip(fn(rng, sdf[idx], ctx), 0.0, 1.0)
  if return_masks:
    return images, styles.coverage(sdf).astype(np.float32)
  return images


# The kinds of ``no_object_images``, in the order of their ids.
NO_OBJECT_KINDS: tuple[str, ...] = ("background", "uniform noise", "gaussian noise", "smooth noise",
                                    "flat colour", "noisy background")


def no_object_images(n: int, seed: int | np.random.SeedSequence,
                     spec: RenderSpec = RenderSpec()) -> tuple[np.ndarray, np.ndarray]:
  """n images that hold no object, for a judge's ``NO_OBJECT`` class.

  Half are a style class's background drawn without the shape (the style's
  own texture and palette, so a judge cannot tell "no object" from the
  style); the rest are split over uniform noise, Gaussian noise around a
  random colour, blurred (smooth) colour noise, a flat colour with mild grain,
  and a background under strong grain. Returns (images (n, H, W, 3) float32
  in [0, 1], kind ids (n,) into ``NO_OBJECT_KINDS``).
  """
  rng = np.random.default_rng(seed)
  size = spec.image_size
  kind = np.where(rng.uniform(size=n) < 0.5, 0, rng.integers(1, len(NO_OBJECT_KINDS), n))
  images = np.empty((n, size, size, 3), np.float32)
  gx, gy = _pixel_grid(size)
  ctx = styles.Ctx(gx + 8.0, gy + 8.0, size / 16.0)
  bg = np.flatnonzero((kind == 0) | (kind == 5))
  sty = rng.integers(0, N_STYLE_CLASSES, len(bg))
  far = np.full((len(bg), size, size), 1e3)  # every pixel far outside any shape: coverage 0
  for s, fn in enumerate(styles.STYLE_FNS):
    idx = np.flatnonzero(sty == s)
    if idx.size:
      images[bg[idx]] = np.clip(fn(rng, far[idx], ctx), 0.0, 1.0)
  shape = (size, size, 3)
  for i in np.flatnonzero(kind != 0):
    k = kind[i]
    if k == 1:
      x = rng.uniform(0, 1, shape)
    elif k == 2:
      x = rng.normal(rng.uniform(0.2, 0.8, 3), rng.uniform(0.05, 0.35), shape)
    elif k == 3:
      sigma = rng.uniform(0.7, 2.5) * size / 16.0
      x = gaussian_filter(rng.normal(0, 1, shape), sigma=(sigma, sigma, 0), mode="wrap")
      x = rng.uniform(0.3, 0.7, 3) + x / (x.std() + 1e-8) * rng.uniform(0.1, 0.3)
    elif k == 4:
      x = rng.uniform(0, 1, 3) + rng.normal(0, rng.uniform(0.0, 0.05), shape)
    else:
      x = images[i] + rng.normal(0, rng.uniform(0.1, 0.3), shape)
    images[i] = np.clip(x, 0.0, 1.0)
  return images, kind.astype(np.int32)


def balanced_labels(n: int, seed: int | np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
  """(object_ids, style_ids) covering every (object, style class) pair equally often (+-1), shuffled."""
  cell = np.arange(n) % (N_OBJECTS * N_STYLE_CLASSES)
  cell = np.random.default_rng(seed).permutation(cell)
  return (cell // N_STYLE_CLASSES).astype(np.int32), (cell % N_STYLE_CLASSES).astype(np.int32)


def sample(n: int, seed: int, spec: RenderSpec = RenderSpec()):
  """n images with balanced labels: (images (n,H,W,3) float32, object_ids (n,), style_ids (n,))."""
  label_seed, render_seed = np.random.SeedSequence(seed).spawn(2)
  obj, sty = balanced_labels(n, label_seed)
  return render(obj, sty, render_seed, spec), obj, sty


def grid(seed: int, spec: RenderSpec = RenderSpec()) -> np.ndarray:
  """One image per (style class, object): (N_STYLE_CLASSES, N_OBJECTS, H, W, 3), no-style last."""
  sty, obj = np.meshgrid(np.arange(N_STYLE_CLASSES), np.arange(N_OBJECTS), indexing="ij")
  images = render(obj.ravel(), sty.ravel(), seed, spec)
  return images.reshape(N_STYLE_CLASSES, N_OBJECTS, *images.shape[1:])


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def grid_png(images: np.ndarray, cell_px: int = 48) -> bytes:
  """PNG bytes of a (rows=style classes, cols=objects) grid with labelled axes."""
  import matplotlib  # deferred: matplotlib only for the preview grid
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # deferred: as above
  rows, cols, h, w, _ = images.shape
  pad = 2
  canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
  for r in range(rows):
    for c in range(cols):
      y, x = pad + r * (h + pad), pad + c * (w + pad)
      canvas[y:y + h, x:x + w] = images[r, c]
  scale = cell_px / (h + pad)
  fig, ax = plt.subplots(figsize=(cols * scale * (h + pad) / 72 + 1.6, rows * scale * (h + pad) / 72 + 0.8),
                         dpi=72)
  ax.imshow(canvas, interpolation="nearest")
  ax.set_xticks([pad + c * (w + pad) + w / 2 - 0.5 for c in range(cols)], OBJECTS[:cols], rotation=45)
  ax.set_yticks([pad + r * (h + pad) + h / 2 - 0.5 for r in range(rows)], STYLE_CLASSES[:rows])
  ax.tick_params(length=0)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return buf.getvalue()
