"""Tests of the activation store's format and units (saemnesia_jax/store/format.py,
store/units.py, and the ``python -m saemnesia_jax.store`` CLI) on the tiny store
of tests/store_helpers.py.

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
import signal
import subprocess
import sys

import numpy as np

try:  # the subprocess writer needs neither pytest nor jax
  import pytest
except ImportError:  # pragma: no cover
  pytest = None

from saemnesia_jax import store as st
from saemnesia_jax.store import units as store_units
from store_helpers import MPC, MPU, N_MAPS, OBJECTS, STEPS, T, D, epoch as _epoch, manifest, map_data
from store_helpers import copy, map_labels, ref, tree, write_units  # noqa: F401 (fixtures)


def _writer_main(argv: list[str]) -> None:
  path, index, count = argv[0], int(argv[1]), int(argv[2])
  kill_at = int(os.environ.get("KILL_AT", "-1"))
  if kill_at >= 0:
    real, calls = store_units.atomic_write_json, [0]

    def dying_write(p, obj):
      if calls[0] == kill_at:  # data of this unit written, marker not yet
        os.kill(os.getpid(), signal.SIGKILL)
      calls[0] += 1
      real(p, obj)
    store_units.atomic_write_json = dying_write
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


def test_config_checks_name_every_store_compression():
  from saemnesia_jax.runtime import checks
  assert set(checks.STORE_COMPRESSIONS) == set(st.COMPRESSIONS)
