"""Tests of saemnesia_jax.sae.sparse: the sparse backward equals the dense reference."""
import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.sae import model as sae
from saemnesia_jax.sae import objectives
from saemnesia_jax.sae import sparse as sae_sparse

D_IN, N_LAT, K, K_AUX, N = 16, 128, 4, 8, 64
# Dead counts: none (AuxK skipped), fewer than k_aux (block of 2 < k_aux), a block of 4, of 64, all (z_pre as it is).
DEAD_COUNTS = (0, 2, 3, 40, 128)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((N, D_IN)), jnp.float32)
  p = sae.init_params(jax.random.key(0), D_IN, N_LAT, x)
  # Nonzero b_enc so that sign / transpose mistakes show; b_dec is the median.
  p["b_enc"] = jnp.asarray(0.1 * rng.standard_normal(N_LAT), jnp.float32)
  masks = [np.zeros(N_LAT, bool) for _ in DEAD_COUNTS]
  for m, n in zip(masks, DEAD_COUNTS):
    m[rng.permutation(N_LAT)[:n]] = True
  return p, x, [jnp.asarray(m) for m in masks]


@functools.lru_cache(maxsize=None)
def _loss_and_grads(batch_topk: bool, backward: str):
  cfg = sae.SaeConfig(k=K, batch_topk=batch_topk, k_aux=K_AUX, backward=backward)
  return jax.jit(jax.value_and_grad(lambda p, x, dead: objectives.unsupervised_loss(p, x, dead, cfg), has_aux=True))


@pytest.mark.parametrize("batch_topk", [False, True])
def test_sparse_loss_and_grads_equal_dense(data, batch_topk):
  p, x, masks = data
  for n_dead, dead in zip(DEAD_COUNTS, masks):
    (l_d, aux_d), g_d = _loss_and_grads(batch_topk, "dense")(p, x, dead)
    (l_s, aux_s), g_s = _loss_and_grads(batch_topk, "sparse")(p, x, dead)
    msg = f"batch_topk={batch_topk} n_dead={n_dead}"
    np.testing.assert_allclose(l_s, l_d, rtol=1e-6, err_msg=msg)
    for key in ("fvu", "auxk", "l0"):
      np.testing.assert_allclose(aux_s[key], aux_d[key], rtol=1e-6, atol=1e-7, err_msg=f"{msg} {key}")
    assert (float(aux_d["auxk"]) > 0) == (n_dead > 0), msg  # AuxK is live exactly when latents are dead
    np.testing.assert_array_equal(aux_s["fired"], aux_d["fired"], err_msg=msg)
    assert int(aux_s["n_dead"]) == n_dead
    for key in g_d:
      scale = float(jnp.max(jnp.abs(g_d[key])))
      assert scale > 0, f"{msg}: zero {key} gradient tests nothing"
      np.testing.assert_allclose(g_s[key], g_d[key], atol=1e-5 * scale, err_msg=f"{msg} grad {key}")


@pytest.mark.parametrize("batch_topk", [False, True])
def test_loss_and_grads_with_auxk_behind_a_cond_equals_dense(data, batch_topk):
  """The train steps' entry: a lax.cond between the step with and without AuxK,
  the same values and gradients as the dense reference for every dead count."""
  p, x, masks = data
  cfg = sae.SaeConfig(k=K, batch_topk=batch_topk, k_aux=K_AUX, backward="sparse")
  f = jax.jit(lambda p, x, dead: objectives.loss_and_grads(p, x, dead, cfg))
  assert "cond[" in str(jax.make_jaxpr(f)(p, x, masks[0]))
  for n_dead, dead in zip(DEAD_COUNTS, masks):
    (l_d, aux_d), g_d = _loss_and_grads(batch_topk, "dense")(p, x, dead)
    (l_s, aux_s), g_s = f(p, x, dead)
    msg = f"batch_topk={batch_topk} n_dead={n_dead}"
    np.testing.assert_allclose(l_s, l_d, rtol=1e-6, err_msg=msg)
    np.testing.assert_allclose(aux_s["auxk"], aux_d["auxk"], rtol=1e-6, atol=1e-7, err_msg=msg)
    assert int(aux_s["n_dead"]) == n_dead
    for key in g_d:
      scale = float(jnp.max(jnp.abs(g_d[key])))
      np.testing.assert_allclose(g_s[key], g_d[key], atol=1e-5 * scale, err_msg=f"{msg} grad {key}")


def test_auxk_is_a_switch_with_a_skip_branch(data):
  p, x, masks = data
  cfg = sae.SaeConfig(k=K, k_aux=K_AUX, backward="sparse")
  jaxpr = str(jax.make_jaxpr(lambda p: objectives.unsupervised_loss(p, x, masks[0], cfg))(p))
  assert "cond[" in jaxpr  # lax.switch lowers to cond: AuxK runs only in the branch for dead latents


def _conds(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _conds(sub)


def test_auxk_gradient_is_computed_inside_the_taken_branch(data):
  """Differentiating through the capacity switch would make every branch output
  every branch's residuals, (N, capacity) arrays written as zeros at each step;
  the switch outputs only the value and the four gradients."""
  p, x, masks = data
  cfg = sae.SaeConfig(k=K, k_aux=K_AUX, backward="sparse")
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: objectives.unsupervised_loss(p, x, masks[3], cfg)[0]))(p).jaxpr
  switch = [e for e in _conds(jaxpr) if len(e.params["branches"]) == 1 + len(sae_sparse._capacities(N_LAT))]
  assert len(switch) == 1, [len(e.params["branches"]) for e in _conds(jaxpr)]
  # sum of squares; gradients of W_dec, W_enc^T, b_dec, b_enc
  assert [v.aval.shape for v in switch[0].outvars] == [(), (N_LAT, D_IN), (N_LAT, D_IN), (D_IN,), (N_LAT,)]


def _same_entries(got, ref):
  """got holds the entries of ref = lax.top_k(...): the same (flat id, value) pairs."""
  order_g, order_r = np.argsort(np.asarray(got[1])), np.argsort(np.asarray(ref[1]))
  np.testing.assert_array_equal(np.asarray(got[1])[order_g], np.asarray(ref[1])[order_r])
  np.testing.assert_array_equal(np.asarray(got[0])[order_g], np.asarray(ref[0])[order_r])


def test_batch_topk_by_block_search_equals_flat_top_k():
  select = jax.jit(sae_sparse._batch_topk_flat, static_argnums=(1, 2))
  rng = np.random.default_rng(1)
  z = jnp.asarray(np.maximum(rng.standard_normal((32, 256)), 0), jnp.float32)
  _same_entries(select(z, 4, 16), jax.lax.top_k(z.reshape(-1), 4 * 32))
  # The block search returns flat-id order (the fallback returns top_k's).
  assert np.all(np.diff(np.asarray(select(z, 4, 16)[1])) > 0)
  # One token holds every winner.
  z2 = z.at[5].add(100.0)
  _same_entries(select(z2, 4, 16), jax.lax.top_k(z2.reshape(-1), 4 * 32))
  # Ties at the k*N-th block maximum and candidate: k*N + 3 blocks hold three
  # 1.0 each, the rest 0.5; the lowest flat ids among the ties win, as in top_k.
  z3 = np.full((16, 64), 0.5, np.float32)
  blocks = rng.choice(16 * 4, size=2 * 16 + 3, replace=False)
  for b in blocks:
    z3[b // 4, (b % 4) * 16 + np.array([1, 7, 12])] = 1.0
  _same_entries(select(jnp.asarray(z3), 2, 16), jax.lax.top_k(jnp.asarray(z3).reshape(-1), 2 * 16))
  # Fewer positive blocks than winners: every block ties at 0, past the margin
  # of tied blocks; the fallback (top_k's order) answers.
  z4 = jnp.zeros((16, 256)).at[:, :2].set(1.0)
  got = select(z4, 4, 16)
  _same_entries(got, jax.lax.top_k(z4.reshape(-1), 16 * 4))
  assert not np.all(np.diff(np.asarray(got[1])) > 0)
  # bfloat16 activations (bfloat16 parameters): many ties, the same entries.
  zb = z.astype(jnp.bfloat16)
  _same_entries(select(zb, 4, 16), jax.lax.top_k(zb.reshape(-1), 4 * 32))


def test_backward_option():
  assert sae.resolve_backward("auto", "cpu") == "sparse"
  assert sae.resolve_backward("auto", "gpu") == "sparse"
  assert sae.resolve_backward("auto", "tpu") == "dense"
  assert sae.resolve_backward("dense", "cpu") == "dense"
  with pytest.raises(ValueError, match="backward"):
    sae.SaeConfig(backward="fast")


def test_top_mask_equals_top_k_with_ties():
  """AuxK's selection: each row's k largest positive entries, ties at the k-th
  value to the lower index, as lax.top_k picks them; rows with fewer than k
  positive entries keep all of them."""
  rng = np.random.default_rng(2)
  v = np.round(np.maximum(rng.standard_normal((64, 96)), 0), 1).astype(np.float32)  # many ties
  v[3] = 0.0  # nothing positive
  v[4, :5] = 0.7  # fewer positive entries than k
  v[4, 5:] = 0.0
  v[5] = 1.5  # every entry tied
  v = jnp.asarray(v)
  for k in (1, 7, 20, 96):
    _, idx = jax.lax.top_k(v, k)
    ref = jnp.zeros(v.shape, bool).at[jnp.arange(v.shape[0])[:, None], idx].set(True) & (v > 0)
    np.testing.assert_array_equal(jax.jit(sae_sparse.top_mask, static_argnums=1)(v, k), ref, err_msg=f"k={k}")
  # A tie-free draw takes the branch without the cumulative sum: the same answer.
  w = jnp.asarray(np.maximum(rng.standard_normal((64, 96)), 0).astype(np.float32))
  _, idx = jax.lax.top_k(w, 20)
  ref = jnp.zeros(w.shape, bool).at[jnp.arange(64)[:, None], idx].set(True) & (w > 0)
  np.testing.assert_array_equal(sae_sparse.top_mask(w, 20), ref)


def test_mixed_matmul_multiplies_rounded_operands_and_accumulates_in_float32():
  """sae.matmul in bfloat16: the product and both gradients are the float32
  products of the bfloat16-rounded operands (and cotangent)."""
  rng = np.random.default_rng(3)
  a, b, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((64, 48), (48, 40), (64, 40)))
  lo = lambda t: t.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  out, vjp = jax.vjp(lambda a, b: sae.matmul(a, b, "bfloat16"), a, b)
  da, db = vjp(g)
  hi = jax.lax.Precision.HIGHEST
  for got, ref in ((out, jnp.dot(lo(a), lo(b), precision=hi)), (da, jnp.dot(lo(g), lo(b).T, precision=hi)),
                   (db, jnp.dot(lo(a).T, lo(g), precision=hi))):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(da - g @ b.T))) > 1e-3  # the rounding is real: not a float32 product
  # Leading axes of a (tokens as (maps, tokens)) give the same product and gradients.
  out3, vjp3 = jax.vjp(lambda a, b: sae.matmul(a, b, "bfloat16"), a.reshape(8, 8, 48), b)
  da3, db3 = vjp3(g.reshape(8, 8, 40))
  np.testing.assert_allclose(out3.reshape(64, 40), out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(da3.reshape(64, 48), da, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(db3, db, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="matmul_dtype"):
    sae.SaeConfig(matmul_dtype="float8")


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) tensor types of every 2-D x 2-D dot_general in StableHLO text."""
  out = []
  for m in re.finditer(r"dot_general .*?: \(tensor<([^>]*)>, tensor<([^>]*)>\)", hlo):
    if m.group(1).count("x") == 2 and m.group(2).count("x") == 2:
      out.append((m.group(1), m.group(2)))
  return out


@pytest.mark.parametrize("batch_topk", [False, True])
def test_bfloat16_matmuls_sparse_equals_dense_and_every_large_matmul_is_bfloat16(data, batch_topk):
  """matmul_dtype='bfloat16': the sparse step agrees with the dense reference
  in the same mode and with float32 to bfloat16's precision, and every
  matrix-matrix product of the step (encoder, AuxK's block, their gradients)
  has bfloat16 operands."""
  p, x, masks = data
  cfgs = {(b, m): sae.SaeConfig(k=K, batch_topk=batch_topk, k_aux=K_AUX, backward=b, matmul_dtype=m)
          for b in ("dense", "sparse") for m in (None, "bfloat16")}
  fs = {key: jax.jit(functools.partial(objectives.loss_and_grads, cfg=cfg)) for key, cfg in cfgs.items()}
  for n_dead, dead in zip(DEAD_COUNTS, masks):
    (l32, _), g32 = fs[("dense", None)](p, x, dead)
    (l_d, aux_d), g_d = fs[("dense", "bfloat16")](p, x, dead)
    (l_s, aux_s), g_s = fs[("sparse", "bfloat16")](p, x, dead)
    msg = f"batch_topk={batch_topk} n_dead={n_dead}"
    np.testing.assert_allclose(l_s, l_d, rtol=1e-3, err_msg=msg)
    np.testing.assert_allclose(l_s, l32, rtol=1e-2, err_msg=msg)
    assert float(l_s) != float(l32), msg  # bfloat16 is in use
    np.testing.assert_array_equal(aux_s["fired"], aux_d["fired"], err_msg=msg)
    for key in g_d:
      # The same selection (one z_pre): agreement to bfloat16's rounding. Against
      # float32 the rounding moves entries across the TopK boundary, so only the
      # gradient's direction is compared there.
      scale = float(jnp.max(jnp.abs(g32[key])))
      np.testing.assert_allclose(g_s[key], g_d[key], atol=2e-2 * scale, err_msg=f"{msg} grad {key}")
      cos = float(jnp.vdot(g_s[key], g32[key]) / (jnp.linalg.norm(g_s[key]) * jnp.linalg.norm(g32[key])))
      assert cos > 0.97, f"{msg} grad {key}: cosine {cos:.3f} to float32"
  hlo = fs[("sparse", "bfloat16")].lower(p, x, masks[3]).as_text()
  dots = _dot_operand_types(hlo)
  assert len(dots) >= 6, dots  # encoder; per AuxK block: its columns, e_hat and 2 gradients, W_enc's gradient
  assert all(a.endswith("bf16") and b.endswith("bf16") for a, b in dots), dots
