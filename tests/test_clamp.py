"""The latent clamp: exactness, selection, specs, and one compile per sweep."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.diffusion import clamp
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax.sae import model as sae
from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec


def _identity_sae(d=4):
  eye = np.eye(d, dtype=np.float32)
  return {"W_enc": jnp.asarray(eye), "b_enc": jnp.zeros(d), "W_dec": jnp.asarray(eye), "b_dec": jnp.zeros(d)}


def _spec(latents, active, scale, threshold, gamma):
  """A spec from mu_target (``scale``, per step and entry) and gamma (per entry)."""
  multiplier = np.asarray(gamma, np.float32)[None] * np.asarray(scale, np.float32)
  return clamp.ClampSpec(np.asarray(latents, np.int32), np.asarray(active, bool), multiplier,
                         np.asarray(threshold, np.float32))


def test_empty_clamp_is_exact():
  rng = np.random.default_rng(0)
  params = sae.init_params(jax.random.PRNGKey(0), 16, 64)
  x = jnp.asarray(rng.standard_normal((2, 3, 3, 16)), jnp.float32)
  out = clamp.clamp(params, clamp.empty_spec(4, 5), x, jnp.int32(2), k=4)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_hand_made_clamp_edits_selected_latents_at_thresholded_tokens():
  # Identity SAE: z = TopK_2(ReLU(x)); select latent 1, threshold 0.5, mu 2, gamma -1.
  x = jnp.asarray([[0.9, 0.8, 0.1, 0.0],    # latent 1 in top-2, 0.8 > 0.5 -> edited
                   [0.9, 0.3, 0.1, 0.0],    # below threshold -> unchanged
                   [0.9, 0.7, 0.8, 0.0],    # latent 1 not in the top 2 -> z_1 = 0 -> unchanged
                   [-1.0, 0.6, -2.0, 0.2]], jnp.float32)  # edited
  spec = _spec([1, 0], [[True, False]], [[2.0, 5.0]], [[0.5, 0.0]], [-1.0, -1.0])
  out = np.asarray(clamp.clamp(_identity_sae(), spec, x, jnp.int32(0), k=2))
  expected = np.asarray(x).copy()
  # z_edit - z = (gamma * mu - 1) * z = -3 z on latent 1, decoded along e_1.
  expected[0, 1] += -3 * 0.8
  expected[3, 1] += -3 * 0.6
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_clamp_equals_dense_formula_and_gates_by_step():
  rng = np.random.default_rng(1)
  params = sae.init_params(jax.random.PRNGKey(1), 8, 32)
  params["b_dec"] = jnp.asarray(rng.standard_normal(8), jnp.float32)
  x = jnp.asarray(rng.standard_normal((40, 8)), jnp.float32)
  k = 5
  z = sae.encode(params, x, k)
  lat = np.argsort(-np.asarray(z).mean(0))[:3]  # latents that fire often
  spec = _spec(lat, [[True] * 3, [False] * 3], [[1.5, 0.5, 2.0]] * 2, [[0.05, 0.0, 0.1]] * 2, [-5.0, -10.0, -1.0])
  out = np.asarray(clamp.clamp(params, spec, x, jnp.int32(0), k))
  z_np = np.asarray(z)
  z_edit = z_np.copy()
  for m, i in enumerate(lat):
    on = z_np[:, i] > spec.threshold[0, m]
    z_edit[on, i] = spec.multiplier[0, m] * z_np[on, i]
  dec = lambda c: c @ np.asarray(params["W_dec"]) + np.asarray(params["b_dec"])
  ref = np.asarray(x) + dec(z_edit) - dec(z_np)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert np.abs(out - np.asarray(x)).max() > 0.1
  # Step 1: every entry inactive -> exact identity.
  np.testing.assert_array_equal(np.asarray(clamp.clamp(params, spec, x, jnp.int32(1), k)), np.asarray(x))


def test_build_spec_union_padding_and_step_map():
  L, S = 6, 3
  mu = np.arange(S * L, dtype=np.float32).reshape(S, L)
  thr = np.full((S, L), 0.5, np.float32)
  a = clamp.concept_entry(mu, thr, -10.0, assigned=4)
  scores = np.zeros((S, L), np.float32)
  scores[:, 1] = 1.0
  scores[2, 2] = 2.0  # latent 2 only at the last scored step
  b = clamp.concept_entry(mu + 100, thr, -5.0, scores_c=scores, percentile=70)
  np.testing.assert_array_equal(b.latents, [1, 2])
  # Sampler at 6 steps, scores at timesteps [900, 500, 100].
  spec = clamp.build_spec([a, b], [950, 800, 600, 450, 200, 50], [900, 500, 100], max_latents=5)
  np.testing.assert_array_equal(clamp.step_map([950, 800, 600, 450, 200, 50], [900, 500, 100]), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(spec.latents, [4, 1, 2, 0, 0])
  np.testing.assert_array_equal(spec.active[:, 3:], False)
  np.testing.assert_array_equal(spec.active[:, 2], [False, False, False, False, True, True])
  np.testing.assert_allclose(spec.multiplier[4], [-10 * mu[2, 4], -5 * (mu[2, 1] + 100), -5 * (mu[2, 2] + 100), 0, 0])
  with pytest.raises(ValueError, match="max_latents=2"):
    clamp.build_spec([a, b], [950], [900, 500, 100], max_latents=2)


def test_a_latent_selected_by_two_concepts_is_edited_once():
  """Sequential unlearning: the union of the latents, one edit each (the most
  negative multiplier), not the sum of both concepts' edits."""
  S, L = 2, 4
  thr = np.zeros((S, L), np.float32)
  mu_a = np.full((S, L), 2.0, np.float32)
  mu_b = np.full((S, L), 3.0, np.float32)
  a = clamp.concept_entry(mu_a, thr, -1.0, assigned=1)  # multiplier -2
  b = clamp.concept_entry(mu_b, thr, -5.0, assigned=1)  # multiplier -15
  c = clamp.concept_entry(mu_b, thr, -0.5, assigned=2)
  spec = clamp.build_spec([a, b, c], [900, 100], [900, 100], max_latents=4)
  np.testing.assert_array_equal(spec.latents[:2], [1, 2])
  np.testing.assert_array_equal(spec.active[:, 2:], False)
  np.testing.assert_allclose(spec.multiplier[:, :2], [[-15.0, -1.5], [-15.0, -1.5]])
  # The edit: z_1 -> -15 z_1 once; x + (z_edit - z) W_dec with the identity SAE.
  params = _identity_sae(L)
  x = jnp.asarray([[0.0, 1.0, 1.0, 0.0]])
  out = np.asarray(clamp.clamp(params, spec, x, jnp.int32(0), k=2))
  np.testing.assert_allclose(out, [[0.0, -15.0, -1.5, 0.0]], atol=1e-6)


def test_gamma_and_concept_sweep_compiles_the_sampler_once(tmp_path):
  pipe = models.load_pipeline(tiny_lib.write_tiny_pipeline(str(tmp_path / "tiny"), seed=2))
  block = "up_blocks.1.attentions.1"
  s = Sampler(pipe, SamplerSpec(num_steps=3, batch_size=2, edit_block=block), clamp.make_edit_fn(k=4))
  params = sae.init_params(jax.random.PRNGKey(0), 64, 128)
  cond = pipe.tokenize(["A cat image in neon style.", "A dog image."])
  uncond = pipe.tokenize(["", ""])
  seeds = np.array([1, 2], np.uint32)
  base = s(pipe.params, cond, uncond, seeds, np.float32(7.0), (params, clamp.empty_spec(3, 4)))
  outs = []
  for latents, gamma in [([3, 7], -1.0), ([3, 7], -20.0), ([11, 12], -5.0)]:
    spec = _spec(latents + [0, 0], [[True, True, False, False]] * 3, np.full((3, 4), 2.0),
                 np.zeros((3, 4)), [gamma] * 2 + [0, 0])
    outs.append(s(pipe.params, cond, uncond, seeds, np.float32(7.0), (params, spec)).images)
  assert s.n_traces == 1
  # The empty clamp leaves the sampler's output as the unedited sampler gives it.
  plain = Sampler(pipe, SamplerSpec(num_steps=3, batch_size=2))(pipe.params, cond, uncond, seeds, np.float32(7.0))
  np.testing.assert_allclose(np.asarray(base.images), np.asarray(plain.images), atol=1e-6)
  assert float(jnp.abs(outs[1] - outs[0]).max()) > 0  # gamma matters


def test_rules_the_papers_leave_open():
  """scale=self: the multiplier is gamma alone; threshold=zero; steps: the first share of the trajectory."""
  n_steps, L = 4, 6
  mu = np.arange(n_steps * L, dtype=np.float32).reshape(n_steps, L) + 1
  thr = np.full((n_steps, L), 0.5, np.float32)
  e = clamp.concept_entry(mu, thr, -2.0, assigned=3)
  spec = clamp.build_spec([e], [40, 30, 20, 10], [40, 30, 20, 10], 2)
  np.testing.assert_allclose(spec.multiplier[:, 0], -2.0 * mu[:, 3])  # the papers': gamma * mu_target
  r = clamp.with_rules(e, scale="self", threshold="zero", steps=0.5)
  spec = clamp.build_spec([r], [40, 30, 20, 10], [40, 30, 20, 10], 2)
  np.testing.assert_allclose(spec.multiplier[:, 0], [-2.0, -2.0, 0.0, 0.0])
  np.testing.assert_array_equal(spec.active[:, 0], [True, True, False, False])  # the noisiest half
  np.testing.assert_array_equal(spec.threshold[:, 0], 0.0)
  late = clamp.build_spec([clamp.with_rules(e, start=0.5)], [40, 30, 20, 10], [40, 30, 20, 10], 2)
  np.testing.assert_array_equal(late.active[:, 0], [False, False, True, True])  # the second half only
  same = clamp.with_rules(e)  # the defaults are the papers' rule
  assert np.array_equal(same.mu, e.mu) and np.array_equal(same.active, e.active)
  with pytest.raises(ValueError, match="steps"):
    clamp.with_rules(e, steps=0.0)
  with pytest.raises(ValueError, match="start"):
    clamp.with_rules(e, start=1.0)
  with pytest.raises(ValueError, match="scale"):
    clamp.with_rules(e, scale="own")
