"""Tests of the activation store (saemnesia_jax/store.py) on a tiny store.

The store: 5 prompts x 2 seeds x 4 steps = 40 maps of 8 tokens x 16 channels;
units of 12 maps (3 trajectories; the last unit holds 4), chunks of 4 maps.
Each map's values are a deterministic function of its row, with channel 0 =
row and channel 1 = token (exact in bfloat16), so every batch can be checked
against the data it should contain.

This file is also the writer script of the subprocess tests:
``python tests/test_store.py PATH PROCESS_INDEX PROCESS_COUNT`` writes that
process's pending units; with ``KILL_AT=k`` it SIGKILLs itself while writing
the k-th unit, after the data and before the marker.
``python tests/test_store.py dist PATH PROCESS_ID PORT`` is one host of a
2-process ``jax.distributed`` run (2 CPU devices each): it writes its units,
reads its share of a global batch and places it on the 4-device mesh.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np

try:  # the subprocess writer needs neither pytest nor jax
  import pytest
except ImportError:  # pragma: no cover
  pytest = None

from saemnesia_jax import store as st

T, D = 8, 16
PROMPTS, SEEDS, STEPS = 5, 2, 4
N_MAPS = PROMPTS * SEEDS * STEPS
MPU, MPC = 12, 4
OBJECTS, STYLES = ["circle", "square", "star"], ["dots", "stripes"]


def manifest(**over) -> dict:
  kw = dict(model_dir="/models/mini", weights_sha256="ab" * 32, block="up_blocks_1/attentions_0",
            scheduler={"name": "ddim", "eta": 0.0}, num_steps=STEPS, guidance_scale=6.0,
            prompt_grid={"objects": OBJECTS, "styles": STYLES, "template": "a {object} in {style} style",
                         "seeds": list(range(SEEDS))},
            n_maps=N_MAPS, tokens_per_map=T, d_in=D, maps_per_unit=MPU, maps_per_chunk=MPC)
  kw.update(over)
  return st.make_manifest(**kw)


def map_data(rows: np.ndarray) -> np.ndarray:
  out = np.stack([np.random.default_rng(int(r)).normal(0.0, 3.0, (T, D)) for r in rows]).astype(np.float32)
  out[:, :, 0] = np.asarray(rows)[:, None]
  out[:, :, 1] = np.arange(T)[None, :]
  return out


def map_labels(rows: np.ndarray) -> dict[str, np.ndarray]:
  rows = np.asarray(rows)
  traj, step = rows // STEPS, rows % STEPS
  prompt, seed = traj // SEEDS, traj % SEEDS
  return {"object": prompt % 3, "style": prompt % 3 - 1, "timestep": 999 - 250 * step, "step": step,
          "prompt": prompt, "seed": seed}


def write_units(store: st.Store, units) -> list[int]:
  for u in units:
    r0, r1 = st.unit_rows(store, u)
    rows = np.arange(r0, r1)
    st.write_unit(store, u, map_data(rows), map_labels(rows))
  return list(units)


def tree(path: str) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = fh.read()
  return out


def _writer_main(argv: list[str]) -> None:
  path, index, count = argv[0], int(argv[1]), int(argv[2])
  kill_at = int(os.environ.get("KILL_AT", "-1"))
  if kill_at >= 0:
    real, calls = st.atomic_write_json, [0]

    def dying_write(p, obj):
      if calls[0] == kill_at:  # data of this unit written, marker not yet
        os.kill(os.getpid(), signal.SIGKILL)
      calls[0] += 1
      real(p, obj)
    st.atomic_write_json = dying_write
  store = st.open_store(path, manifest(), create=True)
  print(json.dumps(write_units(store, st.pending_units(store, index, count))))


def _dist_main(argv: list[str]) -> None:
  path, pid, port = argv[0], int(argv[1]), int(argv[2])
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  store = st.open_store(path, manifest(), create=True)
  units = write_units(store, st.pending_units(store))  # units assigned by jax.process_index()
  multihost_utils.sync_global_devices("units written")
  reader = st.MapBatches(st.open_store(path), 8, seed=2, split="all", buffer_chunks=2)
  x, lab = next(reader)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  gx, glab = st.to_global((x, lab), NamedSharding(mesh, P("data")))
  pos = jnp.arange(1, 9, dtype=jnp.float32)
  wsum = jax.jit(lambda a, r: jnp.stack([(a[:, 0, 0] * pos).sum(), (r * pos).sum()]))(gx, glab["row"])
  print(json.dumps({"units": units, "shape": list(gx.shape), "devices": jax.device_count(),
                    "local_rows": lab["row"].tolist(), "wsum": np.asarray(wsum).tolist()}))
  jax.distributed.shutdown()


def _run_scripts(argvs: list[list[str]], env_extra: dict | None = None) -> list:
  env = dict(os.environ, **(env_extra or {}))
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *a], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
      p.kill()
      stdout, stderr = p.communicate()
    out.append((p.returncode, stdout, stderr))
  return out


def _run_writers(paths_args: list[tuple[str, int, int]], env_extra: dict | None = None) -> list:
  return _run_scripts([[p, str(i), str(c)] for p, i, c in paths_args], env_extra)


if __name__ == "__main__":
  if sys.argv[1] == "dist":
    _dist_main(sys.argv[2:])
  else:
    _writer_main(sys.argv[1:])
  sys.exit(0)


# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> str:
  """A complete store written by one process, in this process."""
  path = str(tmp_path_factory.mktemp("ref") / "store")
  store = st.open_store(path, manifest(), create=True)
  write_units(store, range(store.n_units))
  return path


@pytest.fixture
def copy(ref, tmp_path) -> str:
  dst = str(tmp_path / "store")
  shutil.copytree(ref, dst)
  return dst


def test_roundtrip_layout_and_summary(ref, capsys):
  store = st.open_store(ref)
  assert (store.n_units, store.maps_per_unit, store.maps_per_chunk) == (4, MPU, MPC)
  assert st.unit_rows(store, 3) == (36, 40)
  acts, labels = st.read_unit(store, 3)
  np.testing.assert_array_equal(acts, map_data(np.arange(36, 40)).astype(store.dtype))
  want = map_labels(np.arange(36, 40))
  np.testing.assert_array_equal(labels, np.stack([want[f] for f in st.LABEL_FIELDS], 1))
  # One shard file per unit, one label file per unit.
  files = tree(ref)
  assert sorted(k for k in files if k.startswith("acts/c")) == [f"acts/c/{u}/0/0" for u in range(4)]
  assert len([k for k in files if k.startswith("units/")]) == 4
  s = st.summary(store)
  assert (s["units_done"], s["maps_done"], s["tokens_done"]) == (4, N_MAPS, N_MAPS * T)
  objects = map_labels(np.arange(N_MAPS))["object"]
  assert s["per_object"] == {OBJECTS[o]: int((objects == o).sum()) for o in range(3)}
  assert s["per_style"] == {"(none)": 16, "dots": 16, "stripes": 8}
  assert s["per_timestep"] == {str(999 - 250 * k): N_MAPS // STEPS for k in reversed(range(STEPS))}
  assert st.main(["summary", ref]) == 0
  out = capsys.readouterr().out
  assert "units 4/4" in out and "circle" in out and "maps per timestep" in out
  assert st.pending_units(store, 0, 1) == []


def test_kill_and_resume_gives_identical_store(ref, tmp_path):
  path = str(tmp_path / "store")
  [(rc, out, err)] = _run_writers([(path, 0, 1)], {"KILL_AT": "2"})
  assert rc == -signal.SIGKILL, (rc, out, err)
  store = st.open_store(path)
  assert st.done_units(store).tolist() == [0, 1]
  # Unit 2's data is on disk but it has no marker; leave stale temp files as a
  # writer killed during a file rename would (tensorstore's lock-file names).
  folder = os.path.join(path, "acts", "c", "2", "0")
  assert os.path.exists(os.path.join(folder, "0"))
  for name in ("0.__lock", "0_deadbeef.__lock"):
    with open(os.path.join(folder, name), "wb") as f:
      f.write(b"\xab" * 50_000)
  with pytest.raises(st.StoreError, match="incomplete: 2 of 4 units"):
    st.TokenBatches(store, 8, process_index=0, process_count=1)
  [(rc, out, err)] = _run_writers([(path, 0, 1)])
  assert rc == 0, err
  assert json.loads(out) == [2, 3]  # only the missing units were written
  assert tree(path) == tree(ref)
  [(rc, out, err)] = _run_writers([(path, 0, 1)])  # a third run has nothing to do
  assert rc == 0 and json.loads(out) == [], err
  assert tree(path) == tree(ref)


def test_two_processes_write_the_same_store_as_one(ref, tmp_path):
  path = str(tmp_path / "store")
  results = _run_writers([(path, 0, 2), (path, 1, 2)])
  assert [r[0] for r in results] == [0, 0], results
  assert [json.loads(r[1]) for r in results] == [[0, 2], [1, 3]]
  assert tree(path) == tree(ref)


def _epoch(reader, n):
  return [next(reader) for _ in range(n)]


def test_token_batches_cover_every_token_once_per_epoch(ref):
  store = st.open_store(ref)
  kw = dict(seed=3, split="all", buffer_chunks=2, return_index=True, process_index=0, process_count=1)
  reader = st.TokenBatches(store, 24, drop_remainder=False, **kw)
  nb = reader.batches_per_epoch()
  assert nb == -(-N_MAPS * T // 24)
  data = map_data(np.arange(N_MAPS)).astype(store.dtype).astype(np.float32)
  orders = []
  for _ in range(2):
    batches = _epoch(reader, nb)
    assert [len(x) for x, _ in batches] == [24] * (nb - 1) + [N_MAPS * T - 24 * (nb - 1)]
    ids = np.concatenate([i for _, i in batches])
    x = np.concatenate([b for b, _ in batches])
    assert x.dtype == np.float32 and x.shape[1] == D
    flat = ids[:, 0] * T + ids[:, 1]
    np.testing.assert_array_equal(np.sort(flat), np.arange(N_MAPS * T))  # each token exactly once
    np.testing.assert_array_equal(x, data[ids[:, 0], ids[:, 1]])
    orders.append(flat)
  assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
  # Deterministic in the seed, different across seeds.
  again = np.concatenate([i[:, 0] * T + i[:, 1] for _, i in
                          _epoch(st.TokenBatches(store, 24, drop_remainder=False, **kw), nb)])
  np.testing.assert_array_equal(again, orders[0])
  other = st.TokenBatches(store, 24, drop_remainder=False, **{**kw, "seed": 4})
  assert not np.array_equal(np.concatenate([i[:, 0] * T + i[:, 1] for _, i in _epoch(other, nb)]), orders[0])
  # Tokens mix across maps within a batch (shuffled below the chunk level).
  assert len(np.unique(batches[0][1][:, 0])) > 3
  # drop_remainder: full batches only, still no token twice.
  dropped = st.TokenBatches(store, 24, **kw)
  assert dropped.batches_per_epoch() == N_MAPS * T // 24
  ids = np.concatenate([i for _, i in _epoch(dropped, dropped.batches_per_epoch())])
  assert len(np.unique(ids[:, 0] * T + ids[:, 1])) == len(ids) == 24 * (N_MAPS * T // 24)


def test_reader_resumes_from_saved_state(ref):
  store = st.open_store(ref)
  kw = dict(seed=7, split="all", buffer_chunks=2, return_index=True, process_index=0, process_count=1)
  reader = st.TokenBatches(store, 24, **kw)
  nb = reader.batches_per_epoch()  # 13: the continuation below crosses an epoch
  _epoch(reader, 9)
  saved = json.loads(json.dumps(reader.state()))
  assert (saved["epoch"], saved["batch"]) == (0, 9)
  rest = _epoch(reader, 12)
  assert reader.state()["epoch"] == 1 and reader.state()["batch"] == 21 - nb
  resumed = st.TokenBatches(store, 24, state=saved, **kw)
  for (x0, i0), (x1, i1) in zip(rest, _epoch(resumed, 12)):
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(x0, x1)
  with pytest.raises(st.StoreError, match="cannot resume the reader"):
    st.TokenBatches(store, 24, state=saved, **{**kw, "seed": 8})


def test_map_batches_carry_their_labels(ref):
  store = st.open_store(ref)
  reader = st.MapBatches(store, 4, seed=1, split="all", buffer_chunks=3, process_index=0, process_count=1,
                         dtype=None)
  nb = reader.batches_per_epoch()
  assert nb == N_MAPS // 4
  rows = []
  for x, lab in _epoch(reader, nb):
    assert x.shape == (4, T, D) and x.dtype == store.dtype
    want = map_labels(lab["row"])
    for f in st.LABEL_FIELDS:
      np.testing.assert_array_equal(lab[f], want[f])
    np.testing.assert_array_equal(x, map_data(lab["row"]).astype(store.dtype))
    rows.append(lab["row"])
  np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(N_MAPS))


def test_split_by_trajectory_and_step_filters(ref):
  store = st.open_store(ref)
  common = dict(val_fraction=0.3, split_seed=5, process_index=0, process_count=1, shuffle=False)
  train = st.MapBatches(store, 1, split="train", **common).rows
  val = st.MapBatches(store, 1, split="val", **common).rows
  assert len(np.intersect1d(train, val)) == 0
  np.testing.assert_array_equal(np.union1d(train, val), np.arange(N_MAPS))
  assert 0 < len(val) < N_MAPS
  traj = lambda r: set((r // STEPS).tolist())  # noqa: E731
  assert not traj(train) & traj(val)  # all steps of an image in one split
  assert len(val) % STEPS == 0
  steps = st.MapBatches(store, 1, split="all", step_range=(1, 2), process_index=0, process_count=1).rows
  np.testing.assert_array_equal(steps, [r for r in range(N_MAPS) if r % STEPS in (1, 2)])
  ts_ = st.MapBatches(store, 1, split="all", timestep_range=(700, 999), process_index=0, process_count=1).rows
  np.testing.assert_array_equal(ts_, [r for r in range(N_MAPS) if r % STEPS in (0, 1)])


def test_each_process_reads_its_share_of_every_global_batch(ref):
  store = st.open_store(ref)
  kw = dict(seed=2, split="all", buffer_chunks=2, process_count=2)
  readers = [st.MapBatches(store, 8, process_index=p, **kw) for p in range(2)]
  nbs = [r.batches_per_epoch() for r in readers]
  assert nbs[0] == nbs[1] == N_MAPS // 8
  issued = [[], []]
  for p, r in enumerate(readers):
    real = r._fetch
    r._fetch = lambda rows, key, real=real, p=p: (issued[p].append(np.unique(rows // MPC)), real(rows, key))[1]
  seen = []
  for _ in range(nbs[0]):
    (x0, l0), (x1, l1) = next(readers[0]), next(readers[1])
    assert len(l0["row"]) == len(l1["row"]) == 4
    assert not set(l0["row"].tolist()) & set(l1["row"].tolist())
    seen += l0["row"].tolist() + l1["row"].tolist()
  assert sorted(seen) == list(range(N_MAPS))  # balanced store: every map once
  # A process reads only the chunks of its share (a shared boundary chunk at most).
  chunks = [np.concatenate(c) for c in issued]
  assert len(chunks[0]) + len(chunks[1]) <= N_MAPS // MPC + len(issued[0])
  with pytest.raises(st.StoreError, match="multiple of process_count"):
    st.MapBatches(store, 7, process_index=0, **kw)


def test_to_global_places_batches_on_the_mesh(ref):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert jax.device_count() == 4
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
  store = st.open_store(ref)
  x, lab = next(st.MapBatches(store, 4, split="all"))  # process 0 of 1 from jax
  for spec in (P("data"), P("data", None, None)):
    g = st.to_global((x, lab), NamedSharding(mesh, spec))
    gx, glab = g
    assert isinstance(gx, jax.Array) and gx.shape == x.shape and glab["row"].shape == (4,)
    assert gx.sharding.spec[0] == "data" and glab["object"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(gx), x)
    np.testing.assert_array_equal(np.asarray(glab["object"]), lab["object"])
    for shard in gx.addressable_shards:  # each device holds its half of the batch
      assert shard.data.shape == (2, T, D)
      np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])


def test_manifest_mismatch_is_refused_and_changes_nothing(copy):
  before = tree(copy)
  bad = manifest(weights_sha256="cd" * 32, block="up_blocks_1/attentions_1", d_in=32)
  with pytest.raises(st.ManifestMismatchError) as e:
    st.open_store(copy, bad, create=True)
  msg = str(e.value)
  assert "identity.weights_sha256: expected 'cdcd" in msg and "found 'abab" in msg
  assert "identity.block" in msg and "layout.d_in: expected 32, found 16" in msg
  assert "new store path" in msg
  assert tree(copy) == before
  store = st.open_store(copy, manifest())  # same config: fine, and model_dir is not identity
  st.open_store(copy, manifest(model_dir="/elsewhere"))
  st.check_identity(store, block="up_blocks_1/attentions_0", d_in=D, weights_sha256="ab" * 32)
  with pytest.raises(st.ManifestMismatchError, match="d_in: expected 1280, store has 16"):
    st.check_identity(store, d_in=1280)
  with pytest.raises(st.StoreError, match="no fields"):
    st.check_identity(store, widht=16)
  with pytest.raises(st.StoreError, match="manifest.json missing"):
    st.open_store(os.path.join(copy, "acts"))
  with pytest.raises(st.StoreError, match="not an activation store"):
    st.open_store(os.path.join(copy, "units"), manifest(), create=True)
  assert tree(copy) == before


def test_truncated_chunk_is_reported_and_repairable(copy, ref):
  shard = os.path.join(copy, "acts", "c", "1", "0", "0")
  with open(shard, "rb") as f:
    data = f.read()
  with open(shard, "wb") as f:
    f.write(data[:len(data) // 2])
  before = tree(copy)
  store = st.open_store(copy)
  reader = st.TokenBatches(store, 16, split="all", process_index=0, process_count=1)
  with pytest.raises(st.StoreError) as e:
    _epoch(reader, reader.batches_per_epoch())
  msg = str(e.value)
  assert os.path.join(copy, "acts") in msg and "unit 1" in msg and "verify" in msg and "--repair" in msg
  assert tree(copy) == before
  report = st.verify(store, progress=False)
  assert report["checked"] == 4 and list(report["bad"]) == [1]
  assert tree(copy) == before
  assert st.main(["verify", copy, "--repair"]) == 0
  assert st.pending_units(st.open_store(copy), 0, 1) == [1]
  writer = st.open_store(copy, manifest(), create=True)
  write_units(writer, st.pending_units(writer, 0, 1))
  assert st.verify(writer, progress=False)["bad"] == {}
  assert tree(copy) == tree(ref)


def test_non_finite_input_is_refused_and_writes_nothing(tmp_path):
  path = str(tmp_path / "store")
  store = st.open_store(path, manifest(), create=True)
  before = tree(path)
  rows = np.arange(0, MPU)
  x = map_data(rows)
  x[5, 3, 7] = np.nan
  with pytest.raises(st.StoreError, match=r"1 of 12 maps contain NaN/Inf \(first: map 5 = row 5\)"):
    st.write_unit(store, 0, x, map_labels(rows))
  assert tree(path) == before and st.done_units(store).size == 0
  f16 = st.open_store(str(tmp_path / "f16"), manifest(dtype="float16"), create=True)
  x = map_data(rows)
  x[0, 0, 3] = 1e6
  with pytest.raises(st.StoreError, match="overflow float16"):
    st.write_unit(f16, 0, x, map_labels(rows))
  with pytest.raises(st.StoreError, match=r"shape \(12, 8, 16\)"):
    st.write_unit(store, 0, map_data(rows)[:, :, :8], map_labels(rows))
  with pytest.raises(st.StoreError, match="exactly the fields"):
    st.write_unit(store, 0, map_data(rows), {"object": rows})
  assert tree(path) == before
  # (n, H, W, C) maps are accepted; a done unit is not rewritten by accident.
  st.write_unit(store, 0, map_data(rows).reshape(MPU, 2, 4, D), map_labels(rows))
  with pytest.raises(st.StoreError, match="already complete"):
    st.write_unit(store, 0, map_data(rows), map_labels(rows))


def test_nan_in_store_is_reported(copy):
  raw = st.open_store(copy, manifest(), create=True)
  r0, _ = st.unit_rows(raw, 2)
  raw.acts[r0 + 1, 2, 3].write(np.array(np.nan, raw.dtype)).result()  # bypasses write_unit's checks
  store = st.open_store(copy)
  reader = st.MapBatches(store, 8, split="all", process_index=0, process_count=1)
  with pytest.raises(st.StoreError, match=r"rows 25-26 \(unit 2\).*non-finite"):
    _epoch(reader, reader.batches_per_epoch())
  assert set(st.verify(store, progress=False)["bad"]) == {2}


def test_partial_store_reads_done_units_only(tmp_path):
  path = str(tmp_path / "store")
  store = st.open_store(path, manifest(), create=True)
  write_units(store, [0, 3])
  with pytest.raises(st.StoreError, match="incomplete: 2 of 4 units"):
    st.MapBatches(store, 4, process_index=0, process_count=1)
  reader = st.MapBatches(store, 4, split="all", require_complete=False, process_index=0, process_count=1)
  rows = np.concatenate([lab["row"] for _, lab in _epoch(reader, reader.batches_per_epoch())])
  np.testing.assert_array_equal(np.sort(rows), np.r_[0:12, 36:40])
  assert st.summary(store)["units_done"] == 2


def test_two_jax_hosts_write_and_read_one_store(ref, tmp_path):
  """jax.distributed with 2 local processes: units by jax.process_index(), a
  global batch assembled from each host's share on the 4-device mesh."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  path = str(tmp_path / "store")
  results = _run_scripts([["dist", path, str(i), str(port)] for i in range(2)])
  assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
  outs = [json.loads(r[1].strip().splitlines()[-1]) for r in results]
  assert [o["units"] for o in outs] == [[0, 2], [1, 3]]
  assert tree(path) == tree(ref)
  assert all(o["devices"] == 4 and o["shape"] == [8, T, D] for o in outs)
  # The global batch is host 0's share then host 1's, the same readers give here.
  store = st.open_store(ref)
  local = [next(st.MapBatches(store, 8, seed=2, split="all", buffer_chunks=2, process_index=p,
                              process_count=2))[1]["row"] for p in range(2)]
  assert [o["local_rows"] for o in outs] == [r.tolist() for r in local]
  rows = np.concatenate(local).astype(np.float64)
  want = float((rows * np.arange(1, 9)).sum())
  assert outs[0]["wsum"] == outs[1]["wsum"] == [want, want]


def test_unit_writer_writes_in_background(ref, tmp_path):
  path = str(tmp_path / "store")
  store = st.open_store(path, manifest(), create=True)
  with st.UnitWriter(store, max_in_flight=2) as writer:
    for u in st.pending_units(store, 0, 1):
      r0, r1 = st.unit_rows(store, u)
      writer.submit(u, map_data(np.arange(r0, r1)), map_labels(np.arange(r0, r1)))
  assert tree(path) == tree(ref)
  bad = str(tmp_path / "bad")
  store = st.open_store(bad, manifest(), create=True)
  x = map_data(np.arange(0, MPU))
  x[0, 0, 2] = np.inf
  with pytest.raises(st.StoreError, match="contain NaN/Inf"):
    with st.UnitWriter(store) as writer:
      writer.submit(0, x, map_labels(np.arange(0, MPU)))
  assert st.done_units(store).size == 0
