"""Tests of saemnesia_jax.sae.importance against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.sae import importance as imp


def test_concept_means_against_a_loop():
  r = np.random.default_rng(0)
  n_maps, n_c, n_s, n_l = 40, 3, 2, 5
  codes = r.random((n_maps, n_l)).astype(np.float32)
  cid = r.integers(0, n_c, n_maps)
  sid = r.integers(0, n_s, n_maps)
  cid[:3] = [-1, 1, 3]  # invalid concept / step ids are ignored
  sid[:3] = [0, -1, 1]
  mu, counts = imp.concept_means(jnp.asarray(codes), jnp.asarray(cid), jnp.asarray(sid), n_c, n_s)
  assert mu.shape == (n_c, n_s, n_l) and counts.shape == (n_c, n_s)
  for c in range(n_c):
    for s in range(n_s):
      rows = (cid == c) & (sid == s)
      assert counts[c, s] == rows.sum()
      np.testing.assert_allclose(mu[c, s], codes[rows].mean(0), rtol=1e-6)
  assert float(counts.sum()) == n_maps - 3
  # Sums over two halves add up to the sums over all maps (streaming reduction).
  s1, n1 = imp.concept_sums(codes[:20], cid[:20], sid[:20], n_c, n_s)
  s2, n2 = imp.concept_sums(codes[20:], cid[20:], sid[20:], n_c, n_s)
  np.testing.assert_allclose((s1 + s2) / jnp.maximum(n1 + n2, 1)[..., None], mu, rtol=1e-6)


def test_importance_scores_hand_made():
  mu = jnp.array([[[1.0, 0.0, 1.0]], [[0.0, 2.0, 0.0]], [[0.0, 0.0, 3.0]]])  # (C=3, S=1, L=3)
  counts = jnp.array([[2.0], [1.0], [1.0]])
  s = np.asarray(imp.importance_scores(mu, counts))[:, 0]
  # c0: p_c = [.5, 0, .5]; mu_notc = ([0,2,0] + [0,0,3]) / 2 -> p = [0, .4, .6].
  # c1: p_c = [0, 1, 0]; mu_notc = (2*[1,0,1] + [0,0,3]) / 3 = [2/3, 0, 5/3] -> p = [2/7, 0, 5/7]
  #     (a mean of means would give [.2, 0, .8]: the pooling is over prompts).
  # c2: p_c = [0, 0, 1]; mu_notc = (2*[1,0,1] + [0,2,0]) / 3 -> p = [1/3, 1/3, 1/3].
  expected = np.array([[0.5, -0.4, -0.1],
                       [-2 / 7, 1.0, -5 / 7],
                       [-1 / 3, -1 / 3, 2 / 3]])
  np.testing.assert_allclose(s, expected, atol=1e-6)
  # A concept with no other prompts at a step: mu_notc = 0, score = p_c.
  lone = imp.importance_scores(jnp.array([[[1.0, 3.0]], [[5.0, 5.0]]]), jnp.array([[1.0], [0.0]]))
  np.testing.assert_allclose(lone[0, 0], [0.25, 0.75], atol=1e-6)


def test_percentile_selection():
  s = jnp.array([[[0.0, 1.0, 2.0, 3.0, 4.0]]])
  np.testing.assert_array_equal(imp.percentile_selection(s, 50.0)[0, 0], [False, False, False, True, True])
  # Per (concept, step) thresholds: a step with larger scores does not take over the other.
  two = jnp.stack([s[0, 0], s[0, 0] * 100.0])[None]  # (1, 2, 5)
  np.testing.assert_array_equal(imp.percentile_selection(two, 80.0).sum(-1), [[1, 1]])
  # The paper's percentiles on 20,480 latents keep 3 / 2 / 1 latents.
  big = jax.random.normal(jax.random.key(0), (2, 3, 20480))
  for p, n in ((99.99, 3), (99.995, 2), (99.999, 1)):
    sel = imp.percentile_selection(big, p)
    np.testing.assert_array_equal(sel.sum(-1), n)
    best = jnp.argmax(big, -1)[..., None]
    assert bool(jnp.take_along_axis(sel, best, -1).all())  # the best one is kept


def test_clamp_threshold_and_assigned_selection():
  mu = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  np.testing.assert_allclose(imp.clamp_threshold(mu), (np.asarray(mu)[0] + np.asarray(mu)[1]) / 2)
  sel = imp.assigned_selection(jnp.array([3, 0]), 2, 5)
  assert sel.shape == (2, 2, 5)
  np.testing.assert_array_equal(np.argwhere(np.asarray(sel[:, 0])), [[0, 3], [1, 0]])
  np.testing.assert_array_equal(sel.sum(-1), 1)


def test_association_report_hand_made():
  scores = jnp.array([[0.6, 0.3, 0.1, -0.5],      # mass 1.0: top1 .6, 2 latents reach .9
                      [0.25, 0.25, 0.25, 0.25],   # even: top1 .25, needs all 4
                      [0.05, 0.1, -0.2, 0.85],    # mass 1.0: best latent 3, one reaches .85 < .9 -> 2
                      [-1.0, -1.0, -1.0, -1.0]])  # no positive mass
  rep = imp.association_report(scores)
  np.testing.assert_array_equal(rep["best_latent"][:3], [0, 0, 3])
  np.testing.assert_allclose(rep["top1_share"], [0.6, 0.25, 0.85, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(rep["n_latents_to_mass"], [2, 4, 2, 0])
  # (C, S, L) scores: averaged over steps first.
  rep3 = imp.association_report(jnp.stack([scores, scores], axis=1))
  np.testing.assert_array_equal(rep3["n_latents_to_mass"], [2, 4, 2, 0])


@pytest.mark.parametrize("p", [0.0, 100.0])
def test_percentile_selection_extremes(p):
  s = jnp.array([[[0.0, 1.0, 2.0]]])
  # Strictly above the threshold: p=0 drops only the minimum, p=100 keeps nothing.
  assert int(imp.percentile_selection(s, p).sum()) == (2 if p == 0.0 else 0)
