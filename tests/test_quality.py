"""The image-quality measures under erasure, on hand-made feature sets."""
import numpy as np
import pytest
import scipy.linalg

from saemnesia_jax.evaluation import quality
from saemnesia_jax.evaluation.concepts import NO_STYLE


def _fd_reference(a, b):
  """FID's textbook formula with a d x d matrix square root."""
  mu = np.sum((a.mean(0) - b.mean(0)) ** 2)
  sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(sa @ sb).real
  return mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(root)


def test_identical_sets_give_zero_and_a_shift_gives_its_squared_length():
  x = np.random.default_rng(0).normal(size=(40, 6))
  assert quality.frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
  delta = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])  # same covariance, mean moved: |delta|^2 = 14.25
  assert quality.frechet_distance(x, x + delta) == pytest.approx(14.25, rel=1e-9)
  # Scaled by 2 about the mean: tr S + 4 tr S - 2 * 2 tr S = tr S.
  y = 2 * (x - x.mean(0)) + x.mean(0)
  assert quality.frechet_distance(x, y) == pytest.approx(np.trace(np.cov(x, rowvar=False)), rel=1e-9)


def test_matches_the_matrix_square_root_formula_also_when_wider_than_the_sets():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(30, 8)), rng.normal(0.3, 1.5, size=(25, 8))
  assert quality.frechet_distance(a, b) == pytest.approx(_fd_reference(a, b), rel=1e-6)
  a, b = rng.normal(size=(12, 50)), rng.normal(size=(15, 50)) + 0.2  # singular covariances
  assert quality.frechet_distance(a, b) == pytest.approx(_fd_reference(a, b), rel=1e-4)


def test_recognised_share_counts_right_and_confident_labelled_images():
  true = np.array([0, 1, 2, NO_STYLE, 1])
  pred = np.array([0, 1, 0, 3, 1])
  conf = np.array([0.9, 0.7, 0.99, 0.99, 0.85])
  # labelled: 4 images; right and >= 0.8: the first and the last.
  assert quality.recognised_share(true, pred, conf, 0.8) == 0.5
  assert quality.recognised_share(true, pred, conf, 0.0) == 0.75
  assert np.isnan(quality.recognised_share(np.array([NO_STYLE]), np.array([1]), np.array([1.0]), 0.5))
  with pytest.raises(ValueError, match="recognised_confidence"):
    quality.recognised_share(true, pred, conf, 1.5)


def test_coherent_share_counts_erased_images_whose_other_domain_survived():
  gone = np.array([1, 1, 0, 1, 1, 0], bool)  # the judge no longer names the erased concept
  true = np.array([0, 1, 2, 3, NO_STYLE, 1])
  pred = np.array([0, 2, 2, 3, 3, 1])
  conf = np.array([0.9, 0.99, 0.99, 0.5, 0.99, 0.9])
  # labelled: 5; erased and right at >= 0.8: the first only (the second is
  # wrong, the third kept, the fourth unsure, the last kept).
  assert quality.coherent_share(gone, true, pred, conf, 0.8) == pytest.approx(0.2)
  assert quality.coherent_share(gone, true, pred, conf, 0.0) == pytest.approx(0.4)
  assert quality.coherent_share(np.zeros(6, bool), true, pred, conf, 0.0) == 0.0
  assert np.isnan(quality.coherent_share([True], [NO_STYLE], [1], [1.0], 0.5))
  with pytest.raises(ValueError, match="disagree in shape"):
    quality.coherent_share(gone[:3], true, pred, conf, 0.8)


def test_erasure_quality_splits_the_erased_concepts_images_from_the_rest():
  rng = np.random.default_rng(2)
  base = rng.normal(size=(8, 3))
  feats = base.copy()
  erased = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
  feats[erased] += np.array([0.0, 2.0, 0.0])  # only the erased concept's images move
  q = quality.erasure_quality(erased, feats, base, np.zeros(8, int), np.array([0, 0, 1, 1, 0, 0, 0, 0]),
                              np.full(8, 0.9), 0.5)
  assert q["FD_erased"] == pytest.approx(4.0) and q["FD_kept"] == pytest.approx(0, abs=1e-9)
  assert q["recognised"] == 0.5 and "coherent" not in q
  # erased: the first and third of the erased concept's images; the first is
  # also recognised, so a quarter is erased with the picture kept.
  gone = np.array([1, 0, 1, 0, 1, 1, 1, 1], bool)
  q = quality.erasure_quality(erased, feats, base, np.zeros(8, int), np.array([0, 0, 1, 1, 0, 0, 0, 0]),
                              np.full(8, 0.9), 0.5, gone=gone)
  assert q["coherent"] == 0.25
  with pytest.raises(ValueError, match="disagree in shape"):
    quality.erasure_quality(erased, feats, base[:4], np.zeros(8, int), np.zeros(8, int), None, 0.5)
  table = quality.format_markdown({"saemnesia": {"object": quality.mean_rows([q, {"recognised": float("nan")}])}})
  assert "| saemnesia | object | 4.00 | 0.00 | 50.0 | 25.0 |" in table
