"""Tests of saemnesia_jax.sae.model: encoder/decoder, TopK variants, losses, dead latents,
decoder constraint, and the sharded loss on a 2x2 (data, model) mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saemnesia_jax.sae import model as sae
from saemnesia_jax.sae import objectives

D_IN, N_LAT, K = 8, 32, 4


@pytest.fixture(scope="module")
def params():
  p = sae.init_params(jax.random.key(0), D_IN, N_LAT)
  # Nonzero biases so that sign / transpose mistakes show.
  p["b_enc"] = 0.1 * jax.random.normal(jax.random.key(1), (N_LAT,))
  p["b_dec"] = 0.1 * jax.random.normal(jax.random.key(2), (D_IN,))
  return p


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(3), (16, D_IN))


def test_init_params_layout_and_geometric_median():
  x_sample = jax.random.normal(jax.random.key(4), (64, D_IN)) + 3.0
  p = sae.init_params(jax.random.key(5), D_IN, N_LAT, x_sample)
  assert p["W_enc"].shape == (D_IN, N_LAT) and p["W_dec"].shape == (N_LAT, D_IN)
  assert p["b_enc"].shape == (N_LAT,) and p["b_dec"].shape == (D_IN,)
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  np.testing.assert_array_equal(p["b_enc"], 0.0)
  np.testing.assert_allclose(p["b_dec"], sae.geometric_median(x_sample), rtol=1e-6)
  np.testing.assert_array_equal(sae.init_params(jax.random.key(5), D_IN, N_LAT)["b_dec"], 0.0)
  with pytest.raises(ValueError, match="d_in"):
    sae.init_params(jax.random.key(5), D_IN + 1, N_LAT, x_sample)


def test_geometric_median_known_cases():
  # Odd set of collinear points: the geometric median is the middle point.
  direction = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
  pts = np.array([-7.0, 0.0, 1.0, 2.0, 40.0])[:, None] * direction + np.array([3.0, 1.0, 2.0])
  np.testing.assert_allclose(sae.geometric_median(jnp.asarray(pts, jnp.float32)), pts[2], atol=1e-5)
  # Corners of a unit square plus one far outlier: the median stays near the centre,
  # the mean is dragged away.
  sq = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [100, 100]], np.float32)
  gm = np.asarray(sae.geometric_median(jnp.asarray(sq)))
  assert np.linalg.norm(gm - 0.5) < 1.0 < np.linalg.norm(sq.mean(0) - 0.5)


def test_encode_decode_shapes(params):
  x3 = jax.random.normal(jax.random.key(6), (2, 5, D_IN))
  z = sae.encode(params, x3, K)
  assert z.shape == (2, 5, N_LAT)
  assert sae.decode(params, z).shape == (2, 5, D_IN)
  v, i = sae.encode_sparse(params, x3, K)
  assert v.shape == i.shape == (2, 5, K)
  assert sae.decode_sparse(params, v, i).shape == (2, 5, D_IN)
  z_pre = sae.encode_pre(params, x3)
  expected = np.maximum((np.asarray(x3) - np.asarray(params["b_dec"])) @ np.asarray(params["W_enc"])
                        + np.asarray(params["b_enc"]), 0.0)
  np.testing.assert_allclose(z_pre, expected, rtol=1e-5, atol=1e-6)


def test_topk_keeps_exactly_the_k_largest():
  z = jax.random.uniform(jax.random.key(7), (6, N_LAT)) + 0.01  # all positive, distinct
  values, indices = sae.topk(z, K)
  dense = np.asarray(sae.scatter_codes(values, indices, N_LAT))
  zn = np.asarray(z)
  assert ((dense > 0).sum(axis=1) == K).all()
  for row, d in zip(zn, dense):
    top = np.sort(np.argsort(row)[-K:])
    np.testing.assert_array_equal(np.flatnonzero(d), top)
    np.testing.assert_array_equal(d[top], row[top])
  np.testing.assert_array_equal(dense, np.asarray(sae.encode(
      {"W_enc": jnp.eye(N_LAT), "b_enc": jnp.zeros(N_LAT), "W_dec": jnp.eye(N_LAT), "b_dec": jnp.zeros(N_LAT)},
      z, K)))


def test_batch_topk_keeps_k_times_n_over_the_batch():
  n = 6
  # Uneven rows: token 0 is large everywhere, so it must get more than k latents.
  z = jax.random.uniform(jax.random.key(8), (n, N_LAT)) + 0.01
  z = z.at[0].add(10.0)
  dense = np.asarray(sae.batch_topk(z, K))
  assert (dense > 0).sum() == K * n
  kept = np.sort(dense[dense > 0])
  np.testing.assert_array_equal(kept, np.sort(np.asarray(z).ravel())[-K * n:])
  assert (dense[0] > 0).sum() > K  # not a per-token TopK
  # Leading axes all count as the batch.
  np.testing.assert_array_equal(np.asarray(sae.batch_topk(z.reshape(2, 3, N_LAT), K)).reshape(n, N_LAT), dense)


def test_batch_topk_threshold_is_batch_topk_or_a_superset_of_it():
  n = 6
  z = jax.random.uniform(jax.random.key(8), (n, N_LAT)) + 0.01
  exact = np.asarray(sae.batch_topk(z, K))
  # Every token's winners among its own top 4k: the same codes.
  np.testing.assert_array_equal(np.asarray(sae.batch_topk_threshold(z, K)), exact)
  # Token 0 holds all k*n winners, more than its 4k = 16 candidates: the cut falls
  # lower, every winner is kept and some more; with 8k candidates it is exact again.
  z = z.at[0].add(10.0)
  exact = np.asarray(sae.batch_topk(z, K))
  over = np.asarray(sae.batch_topk_threshold(z, K))
  assert (over > 0).sum() > K * n and np.all(over[exact > 0] == exact[exact > 0])
  np.testing.assert_array_equal(np.asarray(sae.batch_topk_threshold(z, K, per_k=N_LAT // K)), exact)
  np.testing.assert_array_equal(np.asarray(sae.topk_mask(z, K)),
                                np.asarray(sae.scatter_codes(*sae.topk(z, K), N_LAT)))


@pytest.mark.parametrize("batch_topk", [False, True], ids=["topk", "batch_topk"])
def test_the_threshold_selection_gives_the_exact_loss_and_gradients(params, x, batch_topk):
  dead = jnp.arange(N_LAT) % 3 == 0  # AuxK on: its mask replaces a scatter too
  def run(selection):
    cfg = sae.SaeConfig(k=K, batch_topk=batch_topk, backward="dense", selection=selection)
    return jax.value_and_grad(lambda p: objectives.unsupervised_loss(p, x, dead, cfg), has_aux=True)(params)
  (l1, a1), g1 = run("exact")
  (l2, a2), g2 = run("threshold")
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  assert float(a1["auxk"]) > 0 and float(a2["l0"]) == float(a1["l0"])
  np.testing.assert_array_equal(a2["fired"], a1["fired"])
  for k in g1:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert sae.resolve_selection("auto", "tpu") == "threshold" and sae.resolve_selection("auto", "cpu") == "exact"


def test_decode_sparse_equals_decode(params, x):
  values, indices = sae.encode_sparse(params, x, K)
  dense = sae.scatter_codes(values, indices, N_LAT)
  np.testing.assert_allclose(sae.decode_sparse(params, values, indices), sae.decode(params, dense),
                             rtol=1e-6, atol=1e-6)


def test_fvu_and_mse():
  x = jax.random.normal(jax.random.key(9), (32, D_IN))
  assert float(sae.fvu(x, x)) == 0.0
  mean = jnp.broadcast_to(x.mean(0), x.shape)
  np.testing.assert_allclose(sae.fvu(x, mean), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sae.mse(x, x + 2.0), 4.0, rtol=1e-6)


def _auxk_reference(params, x, x_hat, z_pre, dead, k_aux):
  x, x_hat, z_pre = map(np.asarray, (x, x_hat, z_pre))
  w_dec = np.asarray(params["W_dec"])
  e = x - x_hat
  e_hat = np.zeros_like(e)
  dead_ids = np.flatnonzero(dead)
  for t in range(x.shape[0]):
    top = dead_ids[np.argsort(-z_pre[t, dead_ids])[:k_aux]]
    e_hat[t] = z_pre[t, top] @ w_dec[top]
  tv = ((x - x.mean(0)) ** 2).sum()
  return min(len(dead_ids) / k_aux, 1.0) * ((e_hat - e) ** 2).sum() / tv


def test_auxk_zero_without_dead_and_matches_reference(params, x):
  z_pre = sae.encode_pre(params, x)
  x_hat = sae.decode(params, sae.encode(params, x, K))
  none_dead = jnp.zeros(N_LAT, bool)
  assert float(sae.auxk_loss(params, x, x_hat, z_pre, none_dead)) == 0.0
  # Few dead latents (scale n_dead / k_aux < 1), k_aux = d_in // 2 = 4.
  dead = np.zeros(N_LAT, bool)
  dead[[1, 5, 9]] = True
  got = float(sae.auxk_loss(params, x, x_hat, z_pre, jnp.asarray(dead)))
  assert got > 0.0
  np.testing.assert_allclose(got, _auxk_reference(params, x, x_hat, z_pre, dead, D_IN // 2), rtol=1e-5)
  # Many dead latents (scale 1), explicit k_aux.
  dead = np.arange(N_LAT) % 2 == 0
  got = float(sae.auxk_loss(params, x, x_hat, z_pre, jnp.asarray(dead), k_aux=3))
  np.testing.assert_allclose(got, _auxk_reference(params, x, x_hat, z_pre, dead, 3), rtol=1e-5)
  # The residual is a stop-gradient target: no gradient through x_hat.
  g = jax.grad(lambda xh: sae.auxk_loss(params, x, xh, z_pre, jnp.asarray(dead)))(x_hat)
  assert float(jnp.abs(g).max()) == 0.0


def test_dead_counter():
  c = sae.init_dead_counter(4)
  fired = jnp.array([True, False, False, True])
  c = sae.update_dead_counter(c, fired, 100)
  np.testing.assert_array_equal(c, [0, 100, 100, 0])
  c = sae.update_dead_counter(c, jnp.array([False, True, False, False]), 50)
  np.testing.assert_array_equal(c, [50, 0, 150, 50])
  np.testing.assert_array_equal(sae.dead_mask(c, 60), [False, False, True, False])
  big = sae.update_dead_counter(jnp.array([2**31 - 10], jnp.int32), jnp.array([False]), 100)
  assert int(big[0]) == 2**31 - 1  # saturates, does not wrap to negative
  values = jnp.array([[3.0, 0.0], [1.0, 2.0]])
  indices = jnp.array([[0, 2], [2, 1]])
  np.testing.assert_array_equal(sae.fired_from_sparse(values, indices, 4), [True, True, True, False])
  np.testing.assert_array_equal(sae.fired_from_codes(jnp.array([[0.0, 1.0, 0.0]])), [False, True, False])


def test_decoder_constraint(params):
  w = params["W_dec"] * jnp.linspace(0.5, 2.0, N_LAT)[:, None]  # rows of various norms
  g = jax.random.normal(jax.random.key(10), w.shape)
  proj = sae.remove_parallel_grad(w, g)
  np.testing.assert_allclose(jnp.sum(proj * w, axis=1), 0.0, atol=1e-5)
  assert float(jnp.abs(proj - g).max()) > 0.1  # it did change something
  normed = sae.normalize_decoder({**params, "W_dec": w})
  np.testing.assert_allclose(np.linalg.norm(normed["W_dec"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(normed["W_enc"], params["W_enc"])

  tx = optax.chain(sae.project_decoder_grads(), optax.sgd(1.0))
  grads = {k: jax.random.normal(jax.random.key(11), v.shape) for k, v in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(jnp.sum(updates["W_dec"] * params["W_dec"], axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(updates["W_enc"], -grads["W_enc"])
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(grads, tx.init(params))


def test_unsupervised_loss_terms(params, x):
  cfg = sae.SaeConfig(k=K)
  dead = jnp.arange(N_LAT) < 20
  loss, aux = objectives.unsupervised_loss(params, x, dead, cfg)
  x_hat = sae.decode(params, sae.encode(params, x, K))
  np.testing.assert_allclose(aux["fvu"], sae.fvu(x, x_hat), rtol=1e-6)
  np.testing.assert_allclose(loss, aux["fvu"] + aux["auxk"] / 32, rtol=1e-6)
  assert float(aux["auxk"]) > 0.0 and int(aux["n_dead"]) == 20
  assert float(aux["l0"]) <= K
  np.testing.assert_array_equal(aux["fired"], sae.fired_from_codes(sae.encode(params, x, K)))
  sparse_loss, _ = objectives.unsupervised_loss(params, x, dead, sae.SaeConfig(k=K, sparse_decode=True))
  np.testing.assert_allclose(sparse_loss, loss, rtol=1e-5)
  with pytest.raises(ValueError, match="sparse_decode"):
    sae.SaeConfig(k=K, batch_topk=True, sparse_decode=True)


def test_param_partition_specs():
  specs = sae.param_partition_specs()
  assert specs == {"W_enc": P(None, "model"), "b_enc": P("model"), "W_dec": P("model", None), "b_dec": P(None)}


@pytest.mark.parametrize("cfg", [sae.SaeConfig(k=K), sae.SaeConfig(k=K, batch_topk=True),
                                 sae.SaeConfig(k=K, sparse_decode=True),
                                 sae.SaeConfig(k=K, batch_topk=True, backward="dense", selection="threshold")],
                         ids=["topk", "batch_topk", "sparse", "batch_topk_threshold"])
def test_sharded_loss_and_grads_match_single_device(params, cfg):
  devices = jax.devices()
  assert len(devices) >= 4, "tests/conftest.py should give 4 fake CPU devices"
  mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("data", "model"))
  x = jax.random.normal(jax.random.key(12), (32, D_IN))
  dead = jnp.arange(N_LAT) % 3 == 0
  fn = jax.jit(jax.value_and_grad(lambda p, x, d: objectives.unsupervised_loss(p, x, d, cfg), has_aux=True))
  (loss1, aux1), g1 = fn(params, x, dead)

  specs = sae.param_partition_specs("model")
  p_sh = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  x_sh = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  d_sh = jax.device_put(dead, NamedSharding(mesh, P("model")))
  assert p_sh["W_dec"].addressable_shards[0].data.shape == (N_LAT // 2, D_IN)  # really latent-sharded
  (loss2, aux2), g2 = fn(p_sh, x_sh, d_sh)

  np.testing.assert_allclose(loss2, loss1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux2["auxk"], aux1["auxk"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(aux2["fired"], aux1["fired"])
  for k in g1:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-5, atol=1e-5, err_msg=k)
