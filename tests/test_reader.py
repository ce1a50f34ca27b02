"""Tests of the shuffled store readers (saemnesia_jax/store/reader.py) on the tiny store
of tests/store_helpers.py."""
from __future__ import annotations

import json
import weakref

import numpy as np
import pytest

from saemnesia_jax.store import reader as reader_lib
from saemnesia_jax import store as st
from store_helpers import MPC, N_MAPS, STEPS, T, D, epoch as _epoch, manifest, map_data
from store_helpers import copy, map_labels, ref, write_units  # noqa: F401 (fixtures)



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
    real = r._load
    r._load = lambda rows, key, real=real, p=p: (  # key = (seed, epoch, buffer, process)
        key[1] == 0 and issued[p].append(np.unique(rows // MPC)), real(rows, key))[1]
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


def test_each_batch_mixes_tokens_of_every_chunk_of_its_buffer(ref):
  """The shuffle-quality bound of the module docstring: a batch of 32 tokens
  drawn from a buffer of 4 chunks (16 maps, 128 tokens) holds tokens of all 4
  chunks and of at least 12 of its 16 maps (expected 14.0); the last buffer
  holds the 2 remaining chunks."""
  store = st.open_store(ref)
  for seed in range(3):
    reader = st.TokenBatches(store, 32, seed=seed, split="all", buffer_chunks=4, return_index=True,
                             process_index=0, process_count=1, num_epochs=1)
    nb = reader.batches_per_epoch()
    assert nb == N_MAPS * T // 32
    batches = [ids[:, 0] for _, ids in reader]
    for i in range(0, nb, 4):  # 4 batches per full buffer; they cover its maps exactly
      buf_maps = np.unique(np.concatenate(batches[i:i + 4]))
      chunks = np.unique(buf_maps // MPC)
      assert len(buf_maps) == len(chunks) * MPC
      for rows in batches[i:i + 4]:
        np.testing.assert_array_equal(np.unique(rows // MPC), chunks)
        assert len(np.unique(rows)) >= (12 if len(chunks) == 4 else 6), (seed, i)


def test_prefetch_reads_ahead_boundedly_and_yields_the_same_batches(ref):
  """With prefetch=3 and buffers of 1 chunk (32 tokens, 2 batches of 16), the
  first next() has queued batches 0-3 (buffers 0-1) and started reading
  buffers 2-3 (``_READ_AHEAD`` = 2), no more; without prefetch, only buffer 0. Batches and states are
  identical either way, and each batch is its own array (not a view of a
  buffer that later batches reuse)."""
  store = st.open_store(ref)
  kw = dict(seed=1, split="all", buffer_chunks=1, return_index=True, process_index=0, process_count=1)
  runs = {}
  for prefetch in (3, False):
    reader = st.TokenBatches(store, 16, prefetch=prefetch, **kw)
    loads = []
    real = reader._load
    reader._load = lambda rows, key, real=real: (loads.append((key[1], key[2])), real(rows, key))[1]
    first = next(reader)
    assert reader_lib._READ_AHEAD == 2
    assert loads == ([(0, 0), (0, 1), (0, 2), (0, 3)] if prefetch else [(0, 0)])
    out = [first] + _epoch(reader, 2 * reader.batches_per_epoch() + 3)
    runs[prefetch] = (out, reader.state())
    assert max(b for _, b in loads) < reader.batches_per_epoch() // 2 + 1
    assert all(x.flags.owndata or x.base is None or x.base.size == x.size for x, _ in out)
  (a, sa), (b, sb) = runs[3], runs[False]
  assert sa == sb
  for (x0, i0), (x1, i1) in zip(a, b):
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(x0, x1)
  data = map_data(np.arange(N_MAPS)).astype(store.dtype).astype(np.float32)
  for x, ids in a:
    np.testing.assert_array_equal(x, data[ids[:, 0], ids[:, 1]])


def test_batches_stay_valid_while_views_of_them_live(ref):
  """Batch memory is recycled once the consumer drops a batch, never while a
  view made from it is still alive (or the batch itself is)."""
  store = st.open_store(ref)
  data = map_data(np.arange(N_MAPS)).astype(store.dtype).astype(np.float32)
  kept, whole, dropped = [], [], []
  for prefetch in (3, False):
    reader = st.TokenBatches(store, 16, seed=4, split="all", buffer_chunks=1, return_index=True,
                             process_index=0, process_count=1, prefetch=prefetch)
    for i in range(3 * reader.batches_per_epoch()):
      x, ids = next(reader)
      if i % 3 == 0:
        kept.append((x[2:9], ids[2:9]))  # a view; the batch itself is dropped
      elif i % 3 == 1:
        whole.append((x, ids))
      else:
        dropped.append(weakref.ref(x.base))
      del x
  for x, ids in kept + whole:
    np.testing.assert_array_equal(x, data[ids[:, 0], ids[:, 1]])
  # Later batches do reuse the memory of dropped ones.
  bases = [x.base for x, _ in kept + whole]
  assert any(w() is not None and any(w() is b for b in bases) for w in dropped)
