"""Stage `train`: the sharded SAE trainer, unsupervised and supervised."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.sae import sparsify_io
from saemnesia_jax import store
from saemnesia_jax import train
from synthetic import BLOCK, make_concept_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402


@pytest.fixture(scope="module")
def concept_store(tmp_path_factory):
  path = tmp_path_factory.mktemp("store") / "acts"
  st, dirs = make_concept_store(path, seeds=8)
  return str(path), dirs


def _config(workdir, store_path, **train_overrides):
  c = tiny.get_config()
  c.workdir = str(workdir)
  c.block = BLOCK
  c.collect.store_path = store_path
  c.sae.expansion_factor = 4  # 64 latents for d_in 16
  c.sae.k = 4
  c.sae.dead_tokens = 64
  c.train.update(dict(steps=8, batch_size=32, log_every=2, eval_every=4, ckpt_every=4,
                      val_fraction=0.2, val_batches=2, learning_rate=3e-3))
  c.train.update(train_overrides)
  return c


def _tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _setup(c):
  st = train.open_training_store(c)
  return train.setup(c, st.shape), st


def _batches(tr, st, n):
  reader = train.make_reader(tr, st, "train")
  return [train.place(tr, next(reader)) for _ in range(n)]


def test_sharded_step_equals_single_device(concept_store, tmp_path):
  results = {}
  for shape in [(1, 1), (2, 2)]:
    tr, st = _setup(_config(tmp_path, concept_store[0], mesh_shape=shape))
    assert tr.mesh.devices.shape == shape
    batches = _batches(tr, st, 3)
    state = tr.init_fn(batches[0]["x"])
    if shape == (2, 2):  # the latent axis really is split over 'model'
      w = state["params"]["W_enc"]
      assert w.sharding.shard_shape(w.shape) == (16, 32)
    losses = []
    for b in batches:
      state, m = tr.step_fn(state, b)
      losses.append(float(m["loss"]))
    results[shape] = (losses, jax.device_get(state["params"]), np.asarray(state["dead"]))
  (l1, p1, d1), (l4, p4, d4) = results[(1, 1)], results[(2, 2)]
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  for k in p1:
    np.testing.assert_allclose(p1[k], p4[k], atol=2e-5, err_msg=k)
  np.testing.assert_array_equal(d1, d4)  # TopK picked the same latents everywhere
  norms = np.linalg.norm(p4["W_dec"], axis=1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_sparse_sharded_step_equals_dense_single_device(concept_store, tmp_path):
  """The sparse backward on a 2x2 mesh against the dense reference on one device:
  losses, parameters, Adam moments and dead counters after steps with and without AuxK."""
  results = {}
  for shape, backward in [((1, 1), "dense"), ((2, 2), "sparse")]:
    c = _config(tmp_path, concept_store[0], mesh_shape=shape)
    c.sae.backward = backward
    c.sae.dead_tokens = 48  # latents silent for 2 batches of 32 are dead: AuxK runs from step 3
    tr, st = _setup(c)
    batches = _batches(tr, st, 5)
    state = tr.init_fn(batches[0]["x"])
    losses, n_dead = [], []
    for b in batches:
      state, m = tr.step_fn(state, b)
      losses.append(float(m["loss"]))
      n_dead.append(int(m["n_dead"]))
    results[backward] = (losses, n_dead, jax.device_get(state))
  (l_d, nd_d, s_d), (l_s, nd_s, s_s) = results["dense"], results["sparse"]
  assert nd_d == nd_s and nd_d[0] == 0 and max(nd_d) > 0, nd_d  # AuxK both skipped and active
  np.testing.assert_allclose(l_s, l_d, rtol=1e-5)
  np.testing.assert_array_equal(s_s["dead"], s_d["dead"])
  flat_d = jax.tree_util.tree_leaves_with_path(s_d["opt_state"])
  flat_s = jax.tree_util.tree_leaves(s_s["opt_state"])
  assert len(flat_d) == len(flat_s)
  for (path, a), b in zip(flat_d, flat_s):  # Adam mu / nu / count
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  for k in s_d["params"]:
    np.testing.assert_allclose(s_s["params"][k], s_d["params"][k], atol=2e-5, err_msg=k)


def test_interrupted_run_resumes_to_the_same_parameters(concept_store, tmp_path):
  ref = train.train(_config(tmp_path / "ref", concept_store[0]), progress=False)
  cut = train.train(_config(tmp_path / "cut", concept_store[0], stop_after=6), progress=False)
  assert cut["step"] == 6  # 'killed' after step 6; the last checkpoint is at step 4
  resumed = train.train(_config(tmp_path / "cut", concept_store[0]), progress=False)
  assert resumed["step"] == 8
  a, b = jax.device_get(ref["state"]["params"]), jax.device_get(resumed["state"]["params"])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(np.asarray(ref["state"]["dead"]), np.asarray(resumed["state"]["dead"]))
  # The export is a loadable sparsify folder with what produced it.
  params, cfg = sparsify_io.load_sparsify(os.path.join(ref["run_dir"], "export"))
  assert params["W_enc"].shape == (16, 64) and cfg["k"] == 4
  lines = open(os.path.join(ref["run_dir"], "metrics.jsonl")).read().splitlines()
  assert len(lines) == 4 and "val_loss" in lines[-1]
  # The same curves for TensorBoard, read back with TensorBoard's own reader;
  # the resumed run's files show each step once (the steps past the checkpoint purged).
  for run, result in (("ref", ref), ("cut", resumed)):
    logged = [json.loads(l) for l in open(os.path.join(result["run_dir"], "metrics.jsonl"))]
    curves = _tensorboard_scalars(result["run_dir"])
    assert {"loss", "fvu", "dead_fraction", "val_loss"} <= set(curves), (run, sorted(curves))
    assert [s for s, _ in curves["loss"]] == [2, 4, 6, 8], run
    np.testing.assert_allclose([v for _, v in curves["loss"]], [m["loss"] for m in logged], rtol=1e-6)


def test_supervised_finetune_makes_assigned_latents_selective(concept_store, tmp_path):
  """SAEmnesia's pipeline: unsupervised SAE -> scores -> greedy assignment -> supervised fine-tune."""
  import json
  from saemnesia_jax.sae import model as sae
  from saemnesia_jax import scores
  from saemnesia_jax.sae import supervised
  path, _ = concept_store
  unsup = _config(tmp_path, path, steps=100, batch_size=64, eval_every=50, ckpt_every=100, log_every=10)
  train.train(unsup, progress=False)
  unsup.concepts.objects = ("obj0", "obj1", "obj2")
  unsup.concepts.styles = ("sty0", "sty1")
  scores.run(unsup, progress=False)
  sup = _config(tmp_path, path, steps=150, batch_size=16, log_every=10, eval_every=50, ckpt_every=150,
                learning_rate=3e-3)
  sup.sae.update(dict(mode="supervised", assignment="greedy",
                      init_from=os.path.join(tmp_path, "sae_unsup", "export")))
  sup.train.name = "sae_sup"
  result = train.train(sup, progress=False)
  log = [json.loads(l) for l in open(os.path.join(result["run_dir"], "metrics.jsonl"))]
  curves = _tensorboard_scalars(result["run_dir"])
  assert [s for s, _ in curves["object_acc"]] == [m["step"] for m in log]
  assert [s for s, _ in curves["style_acc"]] == [m["step"] for m in log]
  # BCE on post-ReLU map means (logits >= 0) cannot go below log 2 for a
  # negative target: the floor here is about (3 * 0.693) / 5 = 0.42.
  assert log[-1]["l_sup"] < log[0]["l_sup"] - 0.05
  # On every stored map: the assigned latents name the concept, and each
  # assigned latent is the most selective latent for its concept.
  params = jax.device_get(result["state"]["params"])
  st = store.open_store(path)
  x, labels = next(iter(store.MapBatches(st, 144, split="all", shuffle=False, num_epochs=1,
                                         drop_remainder=False)))
  assignment = np.asarray(json.load(open(os.path.join(result["run_dir"], "export", "saemnesia.json")))["assignment"])
  _, aux = supervised.supervised_loss(params, jnp.asarray(x), jnp.asarray(labels["object"]),
                                      jnp.asarray(labels["style"]), jnp.asarray(assignment),
                                      supervised.SupervisedConfig(n_objects=3, k=4))
  assert float(aux["object_acc"]) == 1.0 and float(aux["style_acc"]) == 1.0
  zbar = np.asarray(supervised.map_mean(sae.encode_pre(params, jnp.asarray(x).reshape(-1, 16)), 4))
  for c_id, lat in enumerate(assignment):
    member = labels["object"] == c_id if c_id < 3 else labels["style"] == c_id - 3
    sel = zbar[member].mean(0) - zbar[~member].mean(0)
    assert np.argmax(sel) == lat, (c_id, lat, np.argsort(sel)[-3:])


def test_store_of_another_width_or_block_is_refused(concept_store, tmp_path):
  c = _config(tmp_path, concept_store[0])
  c.sae.d_in = 32
  with pytest.raises(store.ManifestMismatchError, match=r"width 16.*config.sae.d_in=32"):
    _setup(c)
  c = _config(tmp_path, concept_store[0])
  c.block = "up_blocks.1.attentions.0"
  with pytest.raises(store.ManifestMismatchError, match="block"):
    _setup(c)


def test_config_typo_is_an_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "saemnesia_jax.train", "--config", os.path.join(ROOT, "configs/tiny.py"),
       f"--config.workdir={tmp_path}", "--config.sae.kk=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0 and "kk" in proc.stderr
  assert not os.listdir(tmp_path)


def test_two_processes_of_two_devices_train_as_one_of_four(concept_store, tmp_path):
  """launch/local.sh: 2 jax.distributed processes x 2 fake devices reach the
  parameters of 1 process x 4 devices fed the same global batches."""
  overrides = dict(steps=4, batch_size=32, mesh_shape=(-1, 1), val_fraction=0.0, ckpt_every=2, log_every=2,
                   eval_every=100)
  script = tmp_path / "train2.py"
  script.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})
import jax, numpy as np
from test_train import _config
from saemnesia_jax import train
c = _config({str(tmp_path / 'two')!r}, {concept_store[0]!r}, **{overrides!r})
r = train.train(c, progress=False)
assert jax.device_count() == 4 and jax.process_count() == 2
if jax.process_index() == 0:
  np.savez({str(tmp_path / 'two.npz')!r}, **jax.device_get(r["state"]["params"]))
""")
  env = {k: v for k, v in os.environ.items() if not k.startswith("SAEMNESIA_") and k != "XLA_FLAGS"}
  env.update(SAEMNESIA_LOG_DIR=str(tmp_path / "logs"), SAEMNESIA_LOCAL_DEVICES="2", SAEMNESIA_INIT_TIMEOUT="60",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", sys.executable, str(script)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  logs = {f: (tmp_path / "logs" / f).read_text()[-2000:] for f in os.listdir(tmp_path / "logs")}
  assert p.returncode == 0, (p.stderr[-2000:], logs)
  two = dict(np.load(tmp_path / "two.npz"))

  # One process, four devices, the two processes' readers side by side.
  tr, st = _setup(_config(tmp_path / "one", concept_store[0], **overrides))
  assert tr.mesh.devices.shape == (4, 1)
  readers = [train.make_reader(tr, st, "train", process_index=i, process_count=2) for i in range(2)]
  firsts = [next(train.make_reader(tr, st, "train", process_index=i, process_count=2)) for i in range(2)]
  state = tr.init_fn(train.init_sample(tr, np.concatenate(firsts)))
  w0 = np.asarray(state["params"]["W_enc"])
  for _ in range(overrides["steps"]):
    batch = np.concatenate([next(r) for r in readers])
    state, _ = tr.step_fn(state, train.place(tr, batch))
  one = jax.device_get(state["params"])
  assert sorted(two) == sorted(one)
  for k in one:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert np.abs(two["W_enc"] - w0).max() > 1e-4  # it trained


def test_whole_map_batches_hold_every_token_of_their_maps(concept_store, tmp_path):
  """train.batch_from=maps (SAeUron's released batches): a step's tokens are
  whole maps, batch_size / tokens_per_map of them; the epoch counts maps."""
  c = _config(tmp_path, concept_store[0], batch_from="maps")
  tr, st = _setup(c)
  reader = train.make_reader(tr, st, "train", shuffle=False)
  assert isinstance(reader, store.MapBatches)
  maps, _ = next(train.make_reader(tr, st, "train", shuffle=False))
  assert maps.shape == (32 // st.tokens_per_map, st.tokens_per_map, st.d_in)
  x = np.asarray(train.place(tr, next(reader))["x"])
  np.testing.assert_array_equal(x, np.asarray(maps).reshape(32, st.d_in))
  tokens = train.steps_per_epoch(_config(tmp_path, concept_store[0]), st)
  assert train.steps_per_epoch(c, st) == store.MapBatches(st, 8, split="train", val_fraction=0.2, seed=0,
                                                          split_seed=0, shuffle=False).batches_per_epoch()
  assert tokens >= train.steps_per_epoch(c, st)  # the token reader drops less at the epoch's end
  bad = _config(tmp_path, concept_store[0], batch_from="maps", batch_size=30)
  with pytest.raises(Exception, match="multiple of 4"):
    train.make_reader(_setup(bad)[0], st, "train")
