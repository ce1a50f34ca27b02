"""Shuffled batches from an activation store, for the trainer.

Reader (``TokenBatches``, ``MapBatches``): for epoch ``e`` the chunks holding
selected maps are put in a random order drawn from ``(seed, e)``; consecutive
groups of ``buffer_chunks * process_count`` chunks form a *buffer*; process
``p`` takes the ``p``-th contiguous share of the buffer's maps (so it reads
only about 1/process_count of each buffer), shuffles its items (tokens or
maps) with ``(seed, e, buffer, p)`` and cuts its stream into local batches of
``batch_size / process_count``; batches run across buffer boundaries. Every
process computes the same number of batches per epoch from metadata alone
(the minimum over processes). With one process every selected item appears
exactly once per epoch (the last partial batch is dropped unless
``drop_remainder=False``); with several, shares differ by at most one map per
buffer and those few surplus items are dropped for that epoch. ``state()`` is
``{epoch, batch}`` plus a fingerprint of the configuration and of the selected
rows; a reader built with ``state=`` resumes at that batch and yields the same
sequence (the batches depend on the seed and the position only, never on
timing or on ``prefetch``).

Data path (measured here: reading single rows runs at 3-6 MB/s, whole
chunks at hundreds): a buffer is read as whole chunks, one tensorstore read per chunk,
all in flight at once; tensorstore reads, checks (crc32c) and decompresses
them in its own thread pool, straight into the buffer's array (store dtype).
Batches are gathered from the buffer by the shuffled order and cast
(bfloat16 -> float32 as a 16-bit shift, exact) by ``prefetch`` worker threads
(numpy's loops release the GIL), ``prefetch`` batches ahead of the consumer
(``True``: ``_PREFETCH``; an int: that many), and the ``_READ_AHEAD`` buffers after the last one a queued batch needs are
already being read, across epoch boundaries too. So reading, decompression and
the cast overlap the trainer's step; ``next()`` only hands over a finished
batch. ``prefetch=False`` does all of it in the caller (no threads).

Shuffle quality against memory: a batch of b tokens is drawn uniformly from
one buffer (two at a boundary) of ``buffer_chunks`` chunks, so it holds
tokens of about ``buffer_chunks * (1 - (1 - 1/buffer_chunks) ** b)`` chunks:
every chunk of its buffer once b is a few times ``buffer_chunks``
(tests/test_reader.py checks this bound). Consecutive batches share their
buffer, hence their chunks; across buffers, chunks are in a fresh random
order each epoch. Host memory: the buffers that the queued batches draw from
plus ``_READ_AHEAD``, each ``buffer_chunks * maps_per_chunk`` maps in the
store dtype, plus ``1 + prefetch`` batches in ``dtype``. At SD scale with the
defaults (32 chunks of 2 maps: 42 MB per buffer, 16,384 tokens; batches of
4,096 tokens, 10.5 MB in bfloat16, as the trainer reads them) that is 4 buffers
and 4 batches, about 210 MB.
Buffer and batch arrays are reused (``host_arrays.POOL``, process-wide, at
most 256 MB kept once readers are gone): a fresh array costs a kernel
zero-fill per page. ``dtype=None`` yields the store dtype (half the bytes to move to an
accelerator; cast there).

Train/validation split: by trajectory. Each map's ``(prompt, seed)`` is hashed
(splitmix64 with ``split_seed``) to u in [0, 1); maps with u < val_fraction are
validation. All steps of one image land in the same split (adjacent steps are
near-duplicates, so a per-map split would leak). With the natural row order
and ``maps_per_chunk`` dividing the number of steps, no chunk straddles the
split, so neither split reads data it throws away.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorstore as ts

from saemnesia_jax.runtime import host_arrays
from saemnesia_jax.store.format import Store, StoreError, _normalise
from saemnesia_jax.store.units import _read_error, done_units, read_labels

# --------------------------------------------------------------------------
# Reader


def _splitmix(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.uint64)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def split_hash(keys: np.ndarray, split_seed: int) -> np.ndarray:
  """Uniform u in [0, 1) per row of integer ``keys`` (n, k), from ``split_seed``."""
  h = np.full((keys.shape[0],), (split_seed + 0x9E3779B97F4A7C15) % (1 << 64), np.uint64)
  for j in range(keys.shape[1]):
    h = _splitmix(h ^ keys[:, j].astype(np.int64).view(np.uint64))
  return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# Batches assembled ahead by the prefetch threads (``prefetch=True``), and
# buffers whose reads start before the batches that need them are planned.
_PREFETCH = 3
_READ_AHEAD = 2  # two: one buffer's reads in flight while the next is being read (benchmarks/store.py)
_WORKERS = min(4, os.cpu_count() or 1)


class _Buffer:
  """A buffer in flight: its array, the tensorstore reads filling it, and the
  buffer position and id of each of its items in shuffled order.

  Once read, its array goes back to ``host_arrays.POOL`` when the buffer is
  dropped.
  """

  def __init__(self, data: np.ndarray, reads: list, pos: np.ndarray, ids: np.ndarray):
    self.data, self.pos, self.ids = data, pos, ids
    self._reads = reads
    self._lock = threading.Lock()

  def wait(self, store: Store) -> None:
    with self._lock:
      if self._reads is None:
        return
      for r0, r1, fut in self._reads:
        try:
          fut.result()
        except ValueError as e:
          raise _read_error(store, "acts", r0, r1, e) from e
      self._reads = None
      # Recycle only after every write into the array has finished.
      base = self.data if self.data.base is None else self.data.base
      weakref.finalize(self, host_arrays.POOL.put, base)


class _Batches:
  """Shared machinery of TokenBatches and MapBatches (see the module docstring)."""
  _items_per_map: int

  def __init__(
      self,
      store: Store,
      batch_size: int,
      *,
      seed: int = 0,
      split: str = "train",
      val_fraction: float = 0.0,
      split_seed: int = 0,
      split_by: Sequence[str] = ("prompt", "seed"),
      step_range: tuple[int, int] | None = None,
      timestep_range: tuple[int, int] | None = None,
      buffer_chunks: int = 32,
      shuffle: bool = True,
      drop_remainder: bool = True,
      num_epochs: int | None = None,
      dtype: Any = np.float32,
      process_index: int | None = None,
      process_count: int | None = None,
      require_complete: bool = True,
      prefetch: bool | int = True,
      state: Mapping[str, Any] | None = None,
  ):
    if process_index is None or process_count is None:
      import jax  # deferred: the store's CLI and writers need no JAX
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if split not in ("train", "val", "all"):
      raise StoreError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
      raise StoreError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0.0:
      raise StoreError("split='val' with val_fraction=0 selects nothing; set val_fraction")
    if batch_size < 1 or batch_size % process_count:
      raise StoreError(f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
    if not drop_remainder and process_count > 1:
      raise StoreError("drop_remainder=False needs process_count == 1 (global batches must have equal shares)")
    if buffer_chunks < 1:
      raise StoreError(f"buffer_chunks must be >= 1, got {buffer_chunks}")
    self.store = store
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
    self.num_epochs, self.prefetch = num_epochs, prefetch
    self.dtype = np.dtype(dtype) if dtype is not None else store.dtype
    self.process_index, self.process_count = process_index, process_count
    self.buffer_chunks = buffer_chunks

    units = done_units(store)
    if require_complete and len(units) < store.n_units:
      raise StoreError(
          f"activation store {store.path} is incomplete: {store.n_units - len(units)} of {store.n_units} units "
          "are missing. Run the collection again to finish it, or pass require_complete=False to read the "
          "completed units only.")
    self.labels, mask = read_labels(store)
    fields = store.label_fields
    if split != "all" and val_fraction > 0:
      missing = [f for f in split_by if f not in fields]
      if missing:
        raise StoreError(f"split_by fields {missing} are not label fields {list(fields)}")
      u = split_hash(self.labels[:, [fields.index(f) for f in split_by]], split_seed)
      mask &= (u < val_fraction) if split == "val" else (u >= val_fraction)
    for name, rng in (("step", step_range), ("timestep", timestep_range)):
      if rng is not None:
        if name not in fields:
          raise StoreError(f"{name}_range needs a {name!r} label field; the store has {list(fields)}")
        col = self.labels[:, fields.index(name)]
        mask &= (col >= rng[0]) & (col <= rng[1])  # closed interval
    self.rows = np.flatnonzero(mask)
    if len(self.rows) == 0:
      raise StoreError(
          f"no maps selected from {store.path} (done units {len(units)}, split={split!r}, "
          f"val_fraction={val_fraction}, step_range={step_range}, timestep_range={timestep_range})")
    # Selected rows are sorted, so each chunk's rows are one run of self.rows.
    _, self._chunk_starts, self._chunk_lengths = np.unique(
        self.rows // store.maps_per_chunk, return_index=True, return_counts=True)
    config = dict(mode=type(self).__name__, batch_size=batch_size, seed=seed, split=split,
                  val_fraction=val_fraction, split_seed=split_seed, split_by=list(split_by),
                  step_range=step_range, timestep_range=timestep_range, buffer_chunks=buffer_chunks,
                  shuffle=shuffle, drop_remainder=drop_remainder, process_count=process_count)
    h = hashlib.sha256(json.dumps(_normalise(config), sort_keys=True).encode())
    h.update(self.rows.astype("<i8").tobytes())
    self._fingerprint = h.hexdigest()[:16]
    self._config = config
    self._epoch, self._batch = 0, 0
    if state is not None:
      if state.get("fingerprint") != self._fingerprint:
        raise StoreError(
            "cannot resume the reader: the saved state was made with a different configuration or store "
            f"content (saved {dict(state)}, now {config} with {len(self.rows)} maps). Use the same "
            "reader settings and store, or start from epoch 0.")
      self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
    self._gen = None
    self._executor = None
    self._plan_cache: tuple[int, Any] = (-1, None)

  # -- plan (metadata only) --

  def _plan(self, epoch: int) -> tuple[list[np.ndarray], int]:
    """This process's rows per buffer for ``epoch``, and the epoch's batch count.

    Vectorised over chunks: at SD scale an epoch has millions of chunks.
    """
    if self._plan_cache[0] == epoch:
      return self._plan_cache[1]
    n_chunks = len(self._chunk_starts)
    order = (np.random.default_rng([self.seed, epoch]).permutation(n_chunks) if self.shuffle
             else np.arange(n_chunks))
    lengths = self._chunk_lengths[order]
    ends = np.cumsum(lengths)
    pos = np.repeat(self._chunk_starts[order] - (ends - lengths), lengths) + np.arange(ends[-1])
    rows = self.rows[pos]  # selected rows, chunk by chunk in the epoch's order
    g = self.buffer_chunks * self.process_count
    buf_ends = ends[np.minimum(np.arange(g - 1, n_chunks + g - 1, g), n_chunks - 1)]
    buf_starts = np.r_[0, buf_ends[:-1]]
    n = buf_ends - buf_starts
    pc, p = self.process_count, self.process_index
    share = lambda q: buf_starts + (q * n) // pc  # noqa: E731  (start of process q's share)
    totals = np.array([(share(q + 1) - share(q)).sum() for q in range(pc)]) * self._items_per_map
    lo, hi = share(p), share(p + 1)
    mine = [rows[a:b] for a, b in zip(lo.tolist(), hi.tolist())]
    b = self.local_batch_size
    nb = int(totals.min() // b) if self.drop_remainder else int(-(-totals[0] // b))
    self._plan_cache = (epoch, (mine, nb))
    return mine, nb

  def batches_per_epoch(self, epoch: int = 0) -> int:
    return self._plan(epoch)[1]

  # -- reading --

  def _segments(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, chunk) of the runs of ``rows`` that lie in one chunk.

    A buffer's rows are its chunks' rows concatenated, so each chunk is one run.
    """
    if len(rows) == 0:
      return []
    cid = rows // self.store.maps_per_chunk
    starts = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1]])
    stops = np.r_[starts[1:], len(rows)]
    return [(int(a), int(b), int(cid[a])) for a, b in zip(starts, stops)]

  def _load(self, rows: np.ndarray, rng_key: list[int]) -> _Buffer:
    """Starts reading a buffer (returns at once) and shuffles its item order.

    One tensorstore read per chunk, all in flight together: tensorstore reads,
    checks and decompresses them in its own threads, straight into the
    buffer's array. Each read covers the chunk's selected rows from the first
    to the last, so the buffer holds at most ``buffer_chunks`` chunks.
    """
    s = self.store
    segments = self._segments(rows)
    starts = np.array([a for a, _, _ in segments], np.int64)
    stops = np.array([b for _, b, _ in segments], np.int64)
    lo, hi = rows[starts], rows[stops - 1] + 1  # store rows read per chunk
    offset = np.r_[0, np.cumsum(hi - lo)]  # where each chunk lands in the buffer
    data = self._array(int(offset[-1]))
    reads = []
    for k, (r0, r1) in enumerate(zip(lo.tolist(), hi.tolist())):
      dst = ts.array(data[offset[k]:offset[k + 1]], copy=False, write=True)
      reads.append((r0, r1, dst.write(s.acts[r0:r1])))
    seg = np.repeat(np.arange(len(segments)), stops - starts)
    pos = offset[seg] + rows - lo[seg]  # buffer row of each selected row
    if self._items_per_map > 1:
      t = np.arange(s.tokens_per_map)
      pos = (pos[:, None] * s.tokens_per_map + t).reshape(-1)
      ids = (rows[:, None] * s.tokens_per_map + t).reshape(-1)
    else:
      ids = rows
    if self.shuffle:
      perm = np.random.default_rng(rng_key).permutation(len(ids))
      pos, ids = pos[perm], ids[perm]
    return _Buffer(data, reads, pos, ids)

  def _out_array(self, n: int) -> np.ndarray:
    """A batch array, in the memory of a batch the consumer has dropped if any.

    The batch handed out is a view of a base array that returns to the pool
    when the view dies; the pool hands a base out again only once nothing
    else refers to it (the consumer may keep a view made from the batch).
    """
    shape, dtype = (n, *self._item_shape()), self.dtype
    base = host_arrays.POOL.take(lambda a: a.shape == shape and a.dtype == dtype)
    if base is None:
      base = np.empty(shape, dtype)
    out = base[:]
    weakref.finalize(out, host_arrays.POOL.put, base)
    return out

  def _array(self, n: int) -> np.ndarray:
    """A buffer array of ``n`` maps (the pool's, if one is large enough)."""
    s = self.store
    item, dtype = (s.tokens_per_map, s.d_in), s.dtype
    a = host_arrays.POOL.take(lambda a: a.shape[1:] == item and a.dtype == dtype and len(a) >= n)
    if a is None:
      a = np.empty((max(n, self.buffer_chunks * s.maps_per_chunk), *item), dtype)
    return a[:n]

  def _assemble(self, pieces: list[tuple[_Buffer, int, int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch: items ``[lo, hi)`` of each buffer in ``pieces``, gathered and cast.

    Runs in a prefetch thread: numpy's take, shift and isfinite release the
    GIL, so batches are gathered while the trainer's step runs.
    """
    s = self.store
    out = self._out_array(n)
    ids, k = [], 0
    for buf, lo, hi in pieces:
      buf.wait(s)
      src = buf.data.reshape(-1, s.d_in) if self._items_per_map > 1 else buf.data
      host_arrays.gather_cast(src, buf.pos[lo:hi], out[k:k + hi - lo])
      ids.append(buf.ids[lo:hi])
      k += hi - lo
    ids = ids[0] if len(ids) == 1 else np.concatenate(ids)
    if not host_arrays.all_finite(out):
      bad = np.flatnonzero(~np.isfinite(out.astype(np.float32)).reshape(n, -1).all(axis=1))[0]
      r = int(ids[bad]) // max(1, self._items_per_map)
      raise _read_error(s, "acts", r, r + 1, StoreError(
          "non-finite values (NaN/Inf; a missing file reads as NaN)"))
    return out, ids

  def _jobs(self) -> Iterator[tuple[int, int, int, list, int]]:
    """(epoch, batch, batches in the epoch, pieces, size) of every batch from
    the saved position on; a buffer's reads start when its first batch is
    planned, and the next buffer's ``_READ_AHEAD`` buffers later."""
    epoch, start = self._epoch, self._batch
    b = self.local_batch_size
    while self.num_epochs is None or epoch < self.num_epochs:
      bufs, nb = self._plan(epoch)
      if nb == 0:
        raise StoreError(
            f"batch_size {self.batch_size} is larger than the selected data ({len(self.rows)} maps): "
            "use a smaller batch or select more maps")
      ends = np.cumsum([len(r) * self._items_per_map for r in bufs])
      loaded: dict[int, _Buffer] = {}

      def buffer(j: int, epoch=epoch, bufs=bufs, loaded=loaded) -> _Buffer:
        if j not in loaded:
          loaded[j] = self._load(bufs[j], [self.seed, epoch, j, self.process_index])
        return loaded[j]

      for i in range(start, nb):
        lo = i * b
        hi = lo + b if (i < nb - 1 or self.drop_remainder) else int(ends[-1])
        j0 = int(np.searchsorted(ends, lo, side="right"))
        j1 = int(np.searchsorted(ends, hi - 1, side="right"))
        for j in [j for j in loaded if j < j0]:
          del loaded[j]  # pending batches keep what they still need
        pieces = []
        for j in range(j0, j1 + 1):
          base = int(ends[j - 1]) if j else 0
          pieces.append((buffer(j), max(lo, base) - base, min(hi, int(ends[j])) - base))
        if self.prefetch:
          for j in range(j1 + 1, min(j1 + 1 + _READ_AHEAD, len(bufs))):
            buffer(j)
        yield epoch, i, nb, pieces, hi - lo
      epoch, start = epoch + 1, 0

  def _pool(self):
    if self._executor is None:
      self._executor = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="store-prefetch")
    return self._executor

  def _item_shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  def _stream(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    jobs = self._jobs()
    depth = 0 if not self.prefetch else (_PREFETCH if self.prefetch is True else int(self.prefetch))
    pending: collections.deque = collections.deque()
    while True:
      while len(pending) <= depth:
        job = next(jobs, None)
        if job is None:
          break
        task = self._pool().submit(self._assemble, job[3], job[4]) if depth else None
        pending.append((job, task))
      if not pending:
        return
      (epoch, i, nb, pieces, n), task = pending.popleft()
      x, ids = task.result() if task is not None else self._assemble(pieces, n)
      self._epoch, self._batch = (epoch + 1, 0) if i + 1 >= nb else (epoch, i + 1)
      yield x, ids

  def state(self) -> dict:
    """Position of the next batch, JSON-able; pass as ``state=`` to resume."""
    return {"epoch": self._epoch, "batch": self._batch, "fingerprint": self._fingerprint,
            "seed": self.seed, "batch_size": self.batch_size}

  @property
  def epoch(self) -> int:
    return self._epoch

  def __iter__(self):
    return self

  def _next_raw(self) -> tuple[np.ndarray, np.ndarray]:
    if self._gen is None:
      self._gen = self._stream()
    return next(self._gen)


class TokenBatches(_Batches):
  """Shuffled batches of tokens: (local_batch, d_in) arrays (``dtype``).

  With ``return_index`` each batch is ``(x, ids)`` with ids (local_batch, 2)
  int64 = (row, token). ``batch_size`` is global; each process gets
  ``batch_size / process_count`` rows of it (see ``to_global``).
  """
  _items_per_map = 0  # set per store in __init__

  def __init__(self, store: Store, batch_size: int, *, return_index: bool = False, **kw):
    self._items_per_map = store.tokens_per_map
    self.return_index = return_index
    super().__init__(store, batch_size, **kw)

  def _item_shape(self) -> tuple[int, ...]:
    return (self.store.d_in,)

  def __next__(self):
    x, ids = self._next_raw()
    if not self.return_index:
      return x
    t = self.store.tokens_per_map
    return x, np.stack([ids // t, ids % t], axis=1)


class MapBatches(_Batches):
  """Shuffled batches of whole maps with labels, for the supervised loss.

  Yields ``(x, labels)``: x (local_batch, tokens_per_map, d_in) (``dtype``),
  labels a dict field -> (local_batch,) int32, plus ``"row"``, the map's row.
  """
  _items_per_map = 1

  def _item_shape(self) -> tuple[int, ...]:
    return (self.store.tokens_per_map, self.store.d_in)

  def __next__(self):
    x, rows = self._next_raw()
    lab = self.labels[rows]
    out = {f: lab[:, j] for j, f in enumerate(self.store.label_fields)}
    out["row"] = rows.astype(np.int32)  # int32: what jax keeps without x64
    return x, out


def to_global(batch: Any, sharding: Any) -> Any:
  """Places each process's local batch on the mesh as one global jax.Array.

  ``sharding``: the trainer's ``NamedSharding`` for batches (leading axis over
  the data axis); for leaves of lower rank than its spec, the spec is cut to
  the leaf's rank (labels (B,) with a spec P('data', None) -> P('data')).
  Uses ``jax.make_array_from_process_local_data``: the global batch is the
  processes' local batches in the order of the mesh's data axis (process
  order for a mesh built from ``jax.devices()``).
  """
  import jax  # deferred: the store's CLI and writers need no JAX
  from jax.sharding import NamedSharding, PartitionSpec

  def put(x):
    x = np.asarray(x)
    s = sharding
    if isinstance(s, NamedSharding) and len(s.spec) > x.ndim:
      s = NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[:x.ndim]))
    return jax.make_array_from_process_local_data(s, x)

  return jax.tree.map(put, batch)
