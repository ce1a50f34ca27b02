"""Tests of saemnesia_jax.sae.supervised: assignments, the loss terms against a numpy
reference, and a short fine-tune on synthetic concept data."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saemnesia_jax.sae import importance
from saemnesia_jax.sae import model as sae
from saemnesia_jax.sae import supervised as sup

D_IN, N_LAT, T, N_OBJ, N_STY, K = 16, 32, 8, 3, 2, 4


def test_greedy_assignment_hand_made():
  # Object 1 has the best score (0.9 at latent 1) so it picks first, although it is listed
  # second; style 0's best latent (1, 0.95, higher than any object score) is already taken
  # because objects go first.
  obj = np.array([[0.2, 0.8, 0.7, 0.0, 0.1],
                  [0.1, 0.9, 0.3, 0.0, 0.2]])
  sty = np.array([[0.5, 0.95, 0.6, 0.4, 0.1],
                  [0.3, 0.2, 0.65, 0.1, 0.0]])
  # obj1 -> 1; obj0 -> 2 (0.7); sty0 (best 0.95) -> 0 (0.5, as 1 and 2 are taken); sty1 -> 3.
  np.testing.assert_array_equal(sup.greedy_assignment(obj, sty), [2, 1, 0, 3])
  # (C, S, L) scores are averaged over steps first.
  np.testing.assert_array_equal(sup.greedy_assignment(np.stack([obj, obj], 1), np.stack([sty, sty], 1)),
                                [2, 1, 0, 3])
  np.testing.assert_array_equal(sup.greedy_assignment(obj), [2, 1])
  with pytest.raises(ValueError, match="only 5 latents"):
    sup.greedy_assignment(np.ones((4, 5)), np.ones((2, 5)))


def test_random_assignment():
  a = np.asarray(sup.random_assignment(jax.random.key(0), 5, 4, 12))
  assert a.shape == (9,) and a.dtype == np.int32
  assert len(set(a.tolist())) == 9 and a.min() >= 0 and a.max() < 12
  with pytest.raises(ValueError, match="at least 9 latents"):
    sup.random_assignment(jax.random.key(0), 5, 4, 8)


def test_map_mean():
  z = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(6, 4)
  expected = np.asarray(z).reshape(2, 3, 4).mean(1)
  np.testing.assert_allclose(sup.map_mean(z, 3), expected)
  np.testing.assert_allclose(sup.map_mean(z.reshape(2, 3, 4), 3), expected)
  with pytest.raises(ValueError, match="multiple of tokens_per_map"):
    sup.map_mean(z, 4)


def _make_data(n, seed, dirs):
  """Maps whose tokens carry noise plus a fixed direction per object and per style."""
  r = np.random.default_rng(seed)
  obj = r.integers(0, N_OBJ, n)
  sty = r.integers(-1, N_STY, n)  # -1: no style
  x = 0.3 * r.normal(size=(n, T, D_IN))
  x += 2.0 * dirs[obj][:, None, :]
  x += np.where(sty[:, None, None] >= 0, 2.0 * dirs[N_OBJ + np.maximum(sty, 0)][:, None, :], 0.0)
  return jnp.asarray(x, jnp.float32), jnp.asarray(obj, jnp.int32), jnp.asarray(sty, jnp.int32)


@pytest.fixture(scope="module")
def data():
  r = np.random.default_rng(0)
  dirs = r.normal(size=(N_OBJ + N_STY, D_IN))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  return _make_data(64, 1, dirs), _make_data(64, 2, dirs)


def _np_sigmoid_bce(logits, y):
  return np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits))))


def _np_ce(logits, labels):
  lse = np.log(np.exp(logits).sum(-1))
  return lse - logits[np.arange(len(labels)), labels]


def test_supervised_loss_terms_match_numpy(data):
  (x, obj, sty), _ = data
  params = sae.init_params(jax.random.key(3), D_IN, N_LAT, x.reshape(-1, D_IN))
  assign = sup.random_assignment(jax.random.key(4), N_OBJ, N_STY, N_LAT)
  cfg = sup.SupervisedConfig(n_objects=N_OBJ, k=K)
  loss, aux = sup.supervised_loss(params, x, obj, sty, assign, cfg)

  xn, o, s, a = np.asarray(x), np.asarray(obj), np.asarray(sty), np.asarray(assign)
  z = np.asarray(sae.encode_pre(params, x))  # (B, T, L) pre-TopK
  x_hat = np.asarray(sae.decode(params, sae.encode(params, x, K)))
  mse = np.mean((x_hat - xn) ** 2)
  logits = z.mean(1)[:, a]
  y = np.zeros_like(logits)
  y[np.arange(len(o)), o] = 1
  y[np.flatnonzero(s >= 0), N_OBJ + s[s >= 0]] = 1
  bce = _np_sigmoid_bce(logits, y)
  styled = s >= 0
  ce = _np_ce(logits[:, :N_OBJ], o).mean() + _np_ce(logits[styled, N_OBJ:], s[styled]).mean()
  corr = np.corrcoef(logits[:, :N_OBJ].T, logits[:, N_OBJ:].T)[:N_OBJ, N_OBJ:]
  decorr = np.mean(corr ** 2)
  l1 = np.mean(np.abs(z))

  np.testing.assert_allclose(aux["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(aux["bce"], bce, rtol=1e-5)
  np.testing.assert_allclose(aux["softmax_ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(aux["decorr"], decorr, rtol=1e-4)
  np.testing.assert_allclose(aux["l1"], l1, rtol=1e-5)
  np.testing.assert_allclose(loss, mse + 3.0 * bce + 0.01 * l1 + 0.1 * decorr, rtol=1e-5)
  np.testing.assert_allclose(aux["object_acc"], np.mean(logits[:, :N_OBJ].argmax(1) == o), rtol=1e-6)
  np.testing.assert_allclose(aux["style_acc"], np.mean(logits[styled, N_OBJ:].argmax(1) == s[styled]),
                             rtol=1e-6)

  loss_sm, aux_sm = sup.supervised_loss(params, x, obj, sty, assign,
                                        sup.SupervisedConfig(n_objects=N_OBJ, k=K, sup_loss="softmax"))
  np.testing.assert_allclose(aux_sm["l_sup"], ce, rtol=1e-5)
  np.testing.assert_allclose(loss_sm, mse + 3.0 * ce + 0.01 * l1 + 0.1 * decorr, rtol=1e-5)
  with pytest.raises(ValueError, match="'bce' or 'softmax'"):
    sup.SupervisedConfig(n_objects=N_OBJ, sup_loss="ce")


def _selectivity_argmax(params, x, obj, sty):
  """Per concept, the latent with the highest importance score on TopK map means."""
  mm = sae.encode(params, x, K).mean(1)
  zeros = jnp.zeros_like(obj)
  out = []
  for ids, n in ((obj, N_OBJ), (sty, N_STY)):
    mu, counts = importance.concept_means(mm, ids, zeros, n, 1)
    out.append(np.asarray(jnp.argmax(importance.importance_scores(mu, counts)[:, 0], axis=-1)))
  return np.concatenate(out)


@pytest.mark.parametrize("sup_loss", ["bce", "softmax"])
def test_finetune_makes_assigned_latents_selective(data, sup_loss):
  (x, obj, sty), (x_val, obj_val, sty_val) = data
  params = sae.init_params(jax.random.key(0), D_IN, N_LAT, x.reshape(-1, D_IN))
  assign = sup.random_assignment(jax.random.key(1), N_OBJ, N_STY, N_LAT)
  cfg = sup.SupervisedConfig(n_objects=N_OBJ, k=K, sup_loss=sup_loss)
  tx = optax.chain(sae.project_decoder_grads(), optax.clip_by_global_norm(1.0), optax.adam(1e-2))

  @jax.jit
  def step(p, opt_state, x, o, s, a):
    (loss, aux), g = jax.value_and_grad(sup.supervised_loss, has_aux=True)(p, x, o, s, a, cfg)
    updates, opt_state = tx.update(g, opt_state, p)
    return sae.normalize_decoder(optax.apply_updates(p, updates)), opt_state, loss, aux

  before = _selectivity_argmax(params, x_val, obj_val, sty_val)
  assert (before != np.asarray(assign)).any()  # not selective by chance at init
  opt_state = tx.init(params)
  losses = []
  for _ in range(50):
    params, opt_state, loss, aux = step(params, opt_state, x, obj, sty, assign)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  assert float(aux["object_acc"]) == 1.0 and float(aux["style_acc"]) == 1.0
  np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)
  # On held-out maps, each concept's assigned latent is its most selective latent.
  np.testing.assert_array_equal(_selectivity_argmax(params, x_val, obj_val, sty_val), np.asarray(assign))


@pytest.mark.parametrize("batch_topk,sup_loss,selection", [(True, "bce", "exact"), (False, "softmax", "exact"),
                                                          (True, "bce", "threshold")])
def test_micro_batched_step_gives_the_same_update(data, batch_topk, sup_loss, selection):
  """Gradients accumulated over 4 slices == one pass over the whole batch (threshold:
  BatchTopK's cut from each token's top 4k, the TPU default, in both)."""
  (x, obj, sty), _ = data
  params = sae.init_params(jax.random.key(5), D_IN, N_LAT, x.reshape(-1, D_IN))
  assign = sup.random_assignment(jax.random.key(6), N_OBJ, N_STY, N_LAT)
  cfg = sup.SupervisedConfig(n_objects=N_OBJ, k=K, batch_topk=batch_topk, sup_loss=sup_loss, selection=selection)
  whole = jax.jit(jax.value_and_grad(sup.supervised_loss, has_aux=True), static_argnums=5)
  sliced = jax.jit(sup.accumulated_value_and_grad, static_argnums=(5, 6))
  (loss, aux), grads = whole(params, x, obj, sty, assign, cfg)
  (loss_m, aux_m), grads_m = sliced(params, x, obj, sty, assign, cfg, 4)
  np.testing.assert_allclose(loss_m, loss, rtol=1e-5)
  for k in ("mse", "fvu", "l_sup", "bce", "softmax_ce", "l1", "decorr", "object_acc", "style_acc", "l0"):
    np.testing.assert_allclose(aux_m[k], aux[k], rtol=1e-5, atol=1e-7, err_msg=k)
  np.testing.assert_array_equal(aux_m["fired"], aux["fired"])
  for k in grads:
    scale = float(jnp.max(jnp.abs(grads[k]))) + 1e-12
    np.testing.assert_allclose(grads_m[k], grads[k], atol=2e-5 * scale, rtol=1e-4, err_msg=k)
  with pytest.raises(ValueError, match="micro_batches must divide"):
    sup.accumulated_value_and_grad(params, x, obj, sty, assign, cfg, 5)
