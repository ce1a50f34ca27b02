"""Tests of the CanvasMini generator: determinism, labels, style statistics, prompts."""
import itertools
import time

import numpy as np
import pytest
from scipy.ndimage import maximum_filter

from saemnesia_jax.canvas_mini import data as d


@pytest.fixture(scope="module")
def batch():
  """2,200 images, 20 per (object, style class) pair, with their shape masks."""
  obj, sty = d.balanced_labels(2200, 3)
  images, masks = d.render(obj, sty, 9, return_masks=True)
  return images, masks, obj, sty


def test_shapes_dtypes_range(batch):
  images, masks, obj, sty = batch
  assert images.shape == (2200, 16, 16, 3) and images.dtype == np.float32
  assert masks.shape == (2200, 16, 16)
  assert images.min() >= 0 and images.max() <= 1
  # Balanced labels: every (object, style class) pair 20 times.
  counts = np.bincount(obj * d.N_STYLE_CLASSES + sty, minlength=d.N_OBJECTS * d.N_STYLE_CLASSES)
  assert np.all(counts == 20)


def test_deterministic_from_seed():
  a, oa, sa = d.sample(128, 5)
  b, ob, sb = d.sample(128, 5)
  c, _, _ = d.sample(128, 6)
  assert a.tobytes() == b.tobytes() and np.array_equal(oa, ob) and np.array_equal(sa, sb)
  assert a.tobytes() != c.tobytes()
  # Same labels, other seed: different jitter and colours.
  assert not np.array_equal(d.render(oa, sa, 1), d.render(oa, sa, 2))


def test_image_size_is_configurable():
  spec = d.RenderSpec(image_size=32)
  images = d.render([0, 3], [0, d.NO_STYLE_ID], 0, spec)
  assert images.shape == (2, 32, 32, 3)
  # The silhouette scales with the image: same covered fraction at 16 and 32 px.
  frac16 = d.silhouettes().mean((1, 2))
  frac32 = d.silhouettes(spec).mean((1, 2))
  np.testing.assert_allclose(frac16, frac32, atol=0.02)


def test_render_is_fast():
  t = time.perf_counter()
  d.sample(3000, 0)
  # 30k images take about 2 s on the 2-core CPU; 10x slack for a shared machine.
  assert time.perf_counter() - t < 10.0


def test_silhouettes_differ_between_objects():
  sil = d.silhouettes()
  assert sil.shape == (d.N_OBJECTS, 16, 16)
  diff = np.abs(sil[:, None] - sil[None]).sum((2, 3))  # pixels that differ, of 256
  off = diff[~np.eye(d.N_OBJECTS, dtype=bool)]
  assert off.min() >= 15, f"two objects differ by only {off.min():.1f} px"
  # Bold shapes: every object covers at least 50 px of 256.
  assert sil.sum((1, 2)).min() >= 50


# Hand-placed probes, written from the shape descriptions (not from the code's
# distance functions): pixel centres as (x, y) offsets from the image centre
# at 16 px, y pointing down; "in" must be covered, "out" must be empty.
_PROBES = {
    "Disk": {"in": [(0.5, 0.5), (3.5, 0.5), (0.5, -3.5)], "out": [(4.5, 4.5), (-4.5, -4.5), (6.5, 0.5)]},
    "Square": {"in": [(0.5, 0.5), (3.5, 3.5), (-3.5, -3.5)], "out": [(6.5, 0.5), (0.5, -6.5)]},
    "Ring": {"in": [(4.5, 0.5), (-0.5, -4.5)], "out": [(0.5, 0.5), (-0.5, -0.5), (6.5, 6.5)]},
    "Frame": {"in": [(4.5, 4.5), (-4.5, 0.5), (0.5, -4.5)], "out": [(0.5, 0.5), (-1.5, 1.5), (7.5, 0.5)]},
    "Beam": {"in": [(5.5, 0.5), (-5.5, -0.5), (0.5, 0.5)], "out": [(0.5, 3.5), (0.5, -3.5)]},
    "Pillar": {"in": [(0.5, 5.5), (-0.5, -5.5), (0.5, 0.5)], "out": [(3.5, 0.5), (-3.5, 0.5)]},
    "Plus": {"in": [(0.5, 0.5), (5.5, 0.5), (0.5, 5.5), (-5.5, -0.5), (-0.5, -5.5)],
             "out": [(4.5, 4.5), (-4.5, -4.5), (4.5, -4.5), (-4.5, 4.5)]},
    "Tee": {"in": [(-5.5, -4.5), (5.5, -4.5), (0.5, -4.5), (0.5, 4.5)], "out": [(-4.5, 3.5), (4.5, 3.5)]},
    "Corner": {"in": [(-4.5, -5.5), (-4.5, 4.5), (4.5, 4.5)], "out": [(4.5, -4.5), (0.5, -3.5)]},
    "Slash": {"in": [(3.5, -3.5), (-3.5, 3.5), (0.5, 0.5)], "out": [(-3.5, -3.5), (3.5, 3.5)]},
}


def test_objects_look_like_their_names():
  assert set(_PROBES) == set(d.OBJECTS)
  sil = d.silhouettes()
  for k, name in enumerate(d.OBJECTS):
    for kind, probes in _PROBES[name].items():
      for x, y in probes:
        c = sil[k, int(8 + y - 0.5), int(8 + x - 0.5)]
        assert (c > 0.9) if kind == "in" else (c < 0.1), f"{name}: ({x}, {y}) should be {kind}, coverage {c:.2f}"


def test_masks_match_labels_without_jitter():
  spec = d.RenderSpec(position_jitter=0.0, scale_jitter=0.0, rotation_jitter_deg=0.0)
  obj = np.repeat(np.arange(d.N_OBJECTS), d.N_STYLE_CLASSES)
  sty = np.tile(np.arange(d.N_STYLE_CLASSES), d.N_OBJECTS)
  _, masks = d.render(obj, sty, 0, spec, return_masks=True)
  np.testing.assert_array_equal(masks, d.silhouettes(spec)[obj])


def test_jittered_masks_keep_their_identity(batch):
  _, masks, obj, _ = batch
  sil = d.silhouettes()
  best = np.full((len(masks), d.N_OBJECTS), np.inf)
  for dy, dx in itertools.product(range(-1, 2), repeat=2):
    shifted = np.roll(sil, (dy, dx), (1, 2))
    best = np.minimum(best, np.abs(masks[:, None] - shifted[None]).sum((2, 3)))
  acc = np.mean(best.argmin(1) == obj)
  assert acc >= 0.93, f"nearest-template accuracy of jittered masks {acc:.3f}"
  # ... but they are not one image per class.
  for k in range(d.N_OBJECTS):
    m = masks[obj == k]
    assert np.abs(m - m[:1]).sum((1, 2)).max() > 5


def _style_rules(img: np.ndarray, mask: np.ndarray) -> dict[str, bool]:
  """Per-style colour rules written from the style definitions in data.py."""
  fg = mask > 0.99
  bg = maximum_filter(mask, size=3) < 0.01  # one pixel away from the shape
  f, b = img[fg], img[bg]
  sat = lambda x: x.max(-1) - x.min(-1)  # noqa: E731
  slope = lambda v: np.polyfit(np.nonzero(bg)[0], v, 1)[0]  # noqa: E731  change of a ground value per row
  # High-pass residual (pixel minus the mean of its 4 neighbours), per channel and
  # of the chroma R - G (grain is independent per channel, grid lines are not).
  lap = lambda x: np.abs(x - (np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1)  # noqa: E731
                              + np.roll(x, -1, 1)) / 4)[1:-1, 1:-1]
  resid, chroma_resid = lap(img), lap(img[..., 0] - img[..., 1])
  inner_bg = bg[1:-1, 1:-1]
  return {
      # Red / cream stripes on the shape (green channel alternates), teal ground.
      "Stripes": f[:, 1].std() > 0.2 and f[:, 0].min() > 0.6 and bool(np.all(b[:, 1] > b[:, 0])),
      # Black / white (grey, unsaturated) checker ground.
      "Checker": b.mean(-1).std() > 0.3 and sat(b).max() < 0.02,
      # Blue ground getting brighter downwards, saturated shape.
      "Gradient": slope(b.max(-1)) > 0.025
                  and bool(np.all(b[:, 2] > b[:, 0])) and sat(f).mean() > 0.5,
      # Near-black ground, full-brightness shape.
      "Neon": np.percentile(b.max(-1), 75) < 0.15 and f.max(-1).min() > 0.95,
      # Everything light.
      "Pastel": img.min() > 0.4,
      # Exactly grey.
      "Monochrome": bool(np.array_equal(img[..., 0], img[..., 1])
                         and np.array_equal(img[..., 1], img[..., 2])),
      # Black silhouette; ground from purple (B > G) at the top to orange (R >> B) at the bottom.
      "Sunset": f.max() < 0.15 and slope(b[:, 2] - b[:, 1]) < -0.03 and slope(b[:, 0] - b[:, 2]) > 0.03,
      # Strong pixel-level grain on a darkish coloured ground.
      "Noisy": chroma_resid[inner_bg].mean() > 0.05 and sat(b).mean() > 0.1 and b.mean() < 0.6,
      # Black ink around the shape on yellowish-white paper.
      "Comic": (img.max(-1) < 0.15).sum() >= 5 and np.percentile(b.max(-1), 90) > 0.9
               and np.median(sat(b)) < 0.15 and np.median(b[:, 0] - b[:, 2]) > 0.03,
      # Blue ground, light shape.
      "Blueprint": bool(np.all(b[:, 2] > b[:, 0] + 0.3)) and b[:, 2].max() < 0.8 and f.min() > 0.4,
      # Light unsaturated smooth ground, saturated mid-bright shape, no grain.
      "SeedImages": sat(b).max() < 0.35 and 0.45 < b.mean() < 0.95
                    and (sat(f) / f.max(-1)).mean() > 0.4 and f.max(-1).mean() < 0.8
                    and resid[inner_bg].mean() < 0.02,
  }


def test_style_colour_statistics(batch):
  images, masks, _, sty = batch
  hits = np.zeros((d.N_STYLE_CLASSES, d.N_STYLE_CLASSES))
  for img, mask, s in zip(images, masks, sty):
    rules = _style_rules(img, mask)
    hits[s] += [rules[name] for name in d.STYLE_CLASSES]
  hits /= np.bincount(sty)[:, None]
  for k, name in enumerate(d.STYLE_CLASSES):
    assert hits[k, k] >= 0.95, f"{name}: its own rule holds for only {hits[k, k]:.1%} of its images"
    others = np.delete(hits[:, k], k)
    assert others.max() <= 0.05, (
        f"{name}'s rule also holds for {others.max():.1%} of {d.STYLE_CLASSES[np.delete(np.arange(11), k)[others.argmax()]]}")


def test_concept_lists_and_ids():
  assert d.N_OBJECTS >= 10 and d.N_STYLES >= 10
  assert d.NO_STYLE_ID == d.N_STYLES and d.STYLE_CLASSES[d.NO_STYLE_ID] == d.NO_STYLE
  for names in (d.OBJECTS, d.STYLE_CLASSES):
    assert len(set(n.lower() for n in names)) == len(names)
    assert all(n.isalpha() for n in names)  # one word / CamelCase token each
  assert d.object_id("ring") == d.OBJECTS.index("Ring") == d.object_id(d.OBJECTS.index("Ring"))
  assert d.style_id("SeedImages") == d.NO_STYLE_ID


@pytest.mark.parametrize("call, needle", [
    (lambda: d.object_id("Triangle"), "Disk"),
    (lambda: d.object_id(d.N_OBJECTS), "Disk"),
    (lambda: d.style_id("VanGogh"), "Stripes"),
    (lambda: d.style_id(-1), "SeedImages"),
    (lambda: d.prompt("Cat", 0), "Disk"),
    (lambda: d.prompt(0, 99), "Stripes"),
    (lambda: d.prompt(0, 0, variant=1), "anchor"),
    (lambda: d.prompt(0, d.NO_STYLE_ID, variant=7), "A photo of"),
    (lambda: d.render([0, 11], [0, 0], 0), "Disk"),
    (lambda: d.render([0], [12], 0), "SeedImages"),
])
def test_bad_names_and_ids_list_the_valid_ones(call, needle):
  with pytest.raises(ValueError) as e:
    call()
  assert needle in str(e.value)


def test_prompts_and_grid():
  assert d.prompt("Disk", "Neon") == "A Disk image in Neon style."
  assert d.prompt(0, d.NO_STYLE_ID) == "A Disk image."
  assert d.prompt(0, d.NO_STYLE_ID, 2) == "A photo of a Disk."
  grid = d.prompt_grid()
  n_anchor = len(d.ANCHOR_TEMPLATES)
  assert len(grid) == d.N_OBJECTS * d.N_STYLES + d.N_OBJECTS * n_anchor
  assert len({p.prompt for p in grid}) == len(grid)
  pairs = {(p.object_id, p.style_id) for p in grid if p.style_id != d.NO_STYLE_ID}
  assert pairs == set(itertools.product(range(d.N_OBJECTS), range(d.N_STYLES)))
  for p in grid:
    words = d.prompt_words(p.prompt)
    # Labels are right: the prompt names its object (and its style, if any) and no other.
    assert [w for w in words if w in {o.lower() for o in d.OBJECTS}] == [d.OBJECTS[p.object_id].lower()]
    styles = [w for w in words if w in {s.lower() for s in d.STYLES}]
    assert styles == ([] if p.style_id == d.NO_STYLE_ID else [d.STYLES[p.style_id].lower()])
    assert p.prompt == d.prompt(p.object_id, p.style_id, p.variant)
  assert sum(p.style_id == d.NO_STYLE_ID for p in grid) == d.N_OBJECTS * n_anchor


def test_vocabulary_covers_prompts():
  vocab = d.vocabulary()
  assert vocab == sorted(set(vocab)) and all(w == w.lower() and w.isalpha() for w in vocab)
  words = {w for p in d.prompt_grid() for w in d.prompt_words(p.prompt)}
  assert words == set(vocab)
  assert {o.lower() for o in d.OBJECTS} | {s.lower() for s in d.STYLES} <= set(vocab)
  assert len(vocab) <= d.N_OBJECTS + d.N_STYLES + 10
  assert d.prompt_words("A Disk image in Neon style.") == ["a", "disk", "image", "in", "neon", "style"]


def test_grid_and_png():
  g = d.grid(2)
  assert g.shape == (d.N_STYLE_CLASSES, d.N_OBJECTS, 16, 16, 3)
  png = d.grid_png(g)
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
