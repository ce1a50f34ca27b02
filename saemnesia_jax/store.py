"""The activation store: captured UNet block outputs on disk, and their reader.

SAE training reads the output of one UNet block captured at every denoising
step of every (prompt, seed). One captured step is a *map*: an array
(tokens_per_map, d_in) (16 x 16 = 256 tokens x 1280 channels at SD scale,
8 x 8 = 64 x 64 on the miniature), plus integer labels (``LABEL_FIELDS``:
object id, style id (-1: none), scheduler timestep, step index, prompt id,
seed). This module writes maps to disk from many processes, resumably, and
reads them back as shuffled batches for the trainer.

Layout on disk (``PATH/``)::

  manifest.json    what produced the store (compared on every open)
  acts/            zarr v3 array (n_maps, tokens_per_map, d_in), bfloat16/float16
  labels/          zarr v3 array (n_maps, n_fields), int32
  units/u00000012.json   marker of a completed unit: row range + sha256

* Fixed rows. The number of maps is known up front (prompt grid x seeds x
  steps). Maps are cut into *units* of ``maps_per_unit`` consecutive rows; unit
  ``u`` owns rows ``[u * maps_per_unit, (u + 1) * maps_per_unit)`` (the last
  unit may be shorter). Which map goes to which row is the collector's choice;
  the natural one is ``row = trajectory * steps + step`` with
  ``maps_per_unit`` a multiple of ``steps``, so a unit is a whole number of
  sampled trajectories. Rewriting a unit therefore rewrites the same rows: no
  row is ever duplicated.
* One file per unit. ``acts`` uses zarr3's sharding codec with one shard per
  unit (shard shape ``(maps_per_unit, tokens, d_in)``), made of inner chunks of
  ``maps_per_chunk`` maps (the unit of reading and shuffling); ``labels`` has
  one chunk per unit. Units never share a file, so processes writing disjoint
  units never touch the same file, and the store stays at one data file per
  unit (83,200 files for SD instead of millions of chunk files).
* Codecs: bytes -> blosc (lz4, bitshuffle; ``compression``) -> crc32c on every
  inner chunk, crc32c on the shard index. A truncated or altered file is
  therefore an error on read, never silently wrong data. The fill value of
  ``acts`` is NaN and that of ``labels`` is ``LABEL_FILL``, so a missing file
  also reads as invalid, and the reader refuses non-finite values.
* Completion. A unit is done only when its marker exists. ``write_unit``
  writes the data, waits for it to be on disk, then writes the marker
  atomically. A crash at any point loses at most the unit in flight: it has no
  marker and is rewritten, whole, by the next run. ``pending_units(store,
  process_index, process_count)`` lists the units without a marker with
  ``unit % process_count == process_index`` (defaults from ``jax``), so
  several hosts fill disjoint parts of one store, and a store written by two
  processes is byte-identical to one written by one. ``UnitWriter`` runs
  ``write_unit`` in a background thread so that sampling continues meanwhile.
* File locking. tensorstore's file kvstore, in its default locking mode
  (0.1.86), reuses a stale ``<key>.__lock`` temp file left by a killed writer
  without truncating it: the next write leaves the old file's tail in place
  and corrupts the shard (measured). This store opens the kvstore with
  ``file_io_locking: none`` (each write goes to a uniquely named temp file and
  is renamed into place; no two processes write the same file by design) and
  removes a unit's stale temp files before rewriting it.
* Creation is race-safe: the manifest is created with an exclusive link (one
  process wins, the others compare), and tensorstore's open-or-create makes
  identical array metadata. Opening a store with a manifest compares its
  ``identity`` and ``layout`` sections and names every differing field.

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
buffer and those few surplus items are dropped for that epoch. A background
thread reads and shuffles the next buffer while the current one is consumed
(``prefetch``). ``state()`` is ``{epoch, batch}`` plus a fingerprint of the
configuration and of the selected rows; a reader built with ``state=`` resumes
at that batch and yields the same sequence. ``dtype=None`` yields the store
dtype (half the bytes to move to an accelerator; cast there).

Train/validation split: by trajectory. Each map's ``(prompt, seed)`` is hashed
(splitmix64 with ``split_seed``) to u in [0, 1); maps with u < val_fraction are
validation. All steps of one image land in the same split (adjacent steps are
near-duplicates, so a per-map split would leak). With the natural row order
and ``maps_per_chunk`` dividing the number of steps, no chunk straddles the
split, so neither split reads data it throws away.

Sizes: bytes per stored token = d_in x 2 (bf16) x the compression ratio, plus
4 x n_fields / tokens_per_map for labels (0.09 B at SD scale); see
``benchmarks/store.py``.

CLI: ``python -m saemnesia_jax.store summary PATH`` and
``python -m saemnesia_jax.store verify PATH [--repair]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from saemnesia_jax.errors import UserError
from saemnesia_jax.io_utils import atomic_write_json, read_json

FORMAT = "saemnesia_jax.activation_store"
VERSION = 1
LABEL_FIELDS = ("object", "style", "timestep", "step", "prompt", "seed")
LABEL_FILL = int(np.iinfo(np.int32).min)  # marks a label row that was never written
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# What produced the store; all compared on open. model_dir lives in "info"
# (recorded, not compared): moving a model does not change its weights hash.
REQUIRED_IDENTITY = ("weights_sha256", "block", "scheduler", "num_steps", "guidance_scale", "prompt_grid")
_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC = {"name": "crc32c"}


def _blosc(cname: str, clevel: int) -> list[dict]:
  return [{"name": "blosc", "configuration": {
      "cname": cname, "clevel": clevel, "shuffle": "bitshuffle", "typesize": 2, "blocksize": 0}}]


COMPRESSIONS = {
    "blosc-lz4": _blosc("lz4", 5),
    "blosc-zstd": _blosc("zstd", 3),
    "none": [],
}


class StoreError(UserError, RuntimeError):
  """An activation store is missing, inconsistent, corrupt, or misused."""


class ManifestMismatchError(StoreError):
  """The store on disk was made by a different configuration."""


@dataclasses.dataclass(frozen=True)
class Store:
  """An open activation store: its path, manifest and tensorstore handles."""
  path: str
  manifest: dict
  acts: ts.TensorStore
  labels: ts.TensorStore
  writable: bool

  @property
  def layout(self) -> dict:
    return self.manifest["layout"]

  @property
  def n_maps(self) -> int:
    return self.layout["n_maps"]

  @property
  def tokens_per_map(self) -> int:
    return self.layout["tokens_per_map"]

  @property
  def d_in(self) -> int:
    return self.layout["d_in"]

  @property
  def dtype(self) -> np.dtype:
    return DTYPES[self.layout["dtype"]]

  @property
  def maps_per_chunk(self) -> int:
    return self.layout["maps_per_chunk"]

  @property
  def maps_per_unit(self) -> int:
    return self.layout["maps_per_unit"]

  @property
  def n_units(self) -> int:
    return self.layout["n_units"]

  @property
  def label_fields(self) -> tuple[str, ...]:
    return tuple(self.layout["label_fields"])


# --------------------------------------------------------------------------
# Manifest


def default_maps_per_chunk(maps_per_unit: int, map_bytes: int, target_bytes: int = 2 << 20) -> int:
  """Largest divisor of ``maps_per_unit`` whose chunk is at most ``target_bytes``.

  FINDINGS: chunk-aligned reads ran at about 400 MB/s with chunks of
  0.3-2.6 MB and slower with larger ones; reading single rows is slow.
  """
  best = 1
  for m in range(1, maps_per_unit + 1):
    if maps_per_unit % m == 0 and m * map_bytes <= target_bytes:
      best = m
  return best


def make_manifest(
    *,
    model_dir: str,
    weights_sha256: str,
    block: str,
    scheduler: Mapping[str, Any],
    num_steps: int,
    guidance_scale: float,
    prompt_grid: Mapping[str, Any],
    n_maps: int,
    tokens_per_map: int,
    d_in: int,
    maps_per_unit: int,
    maps_per_chunk: int | None = None,
    dtype: str = "bfloat16",
    label_fields: Sequence[str] = LABEL_FIELDS,
    compression: str = "blosc-lz4",
    extra_identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict:
  """Builds a manifest: identity (what produced the maps), layout, info.

  ``prompt_grid`` should hold the concept names (``objects``, ``styles``
  lists are used by ``summary``), the prompt template and the seeds.
  ``maps_per_unit`` is the number of maps written (and lost on a crash) as one
  piece; make it a multiple of ``num_steps`` so a unit is whole trajectories.
  """
  if dtype not in DTYPES:
    raise StoreError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
  if compression not in COMPRESSIONS:
    raise StoreError(f"compression {compression!r} is not supported; use one of {sorted(COMPRESSIONS)}")
  if min(n_maps, tokens_per_map, d_in, maps_per_unit) < 1:
    raise StoreError(
        f"n_maps ({n_maps}), tokens_per_map ({tokens_per_map}), d_in ({d_in}) and maps_per_unit "
        f"({maps_per_unit}) must all be positive")
  if maps_per_chunk is None:
    maps_per_chunk = default_maps_per_chunk(maps_per_unit, tokens_per_map * d_in * DTYPES[dtype].itemsize)
  if maps_per_chunk < 1 or maps_per_unit % maps_per_chunk:
    raise StoreError(
        f"maps_per_unit ({maps_per_unit}) must be a multiple of maps_per_chunk ({maps_per_chunk}) "
        "so that units never share a chunk")
  if len(set(label_fields)) != len(label_fields) or not label_fields:
    raise StoreError(f"label_fields must be distinct names, got {list(label_fields)}")
  identity = dict(weights_sha256=weights_sha256, block=block, scheduler=dict(scheduler),
                  num_steps=num_steps, guidance_scale=guidance_scale, prompt_grid=dict(prompt_grid))
  identity.update(extra_identity or {})
  manifest = {
      "format": FORMAT,
      "version": VERSION,
      "identity": identity,
      "layout": {
          "n_maps": n_maps, "tokens_per_map": tokens_per_map, "d_in": d_in, "dtype": dtype,
          "maps_per_unit": maps_per_unit, "maps_per_chunk": maps_per_chunk,
          "n_units": -(-n_maps // maps_per_unit), "label_fields": list(label_fields),
          "compression": compression, "n_tokens": n_maps * tokens_per_map,
      },
      "info": {"model_dir": model_dir, **dict(info or {})},
  }
  return _normalise(manifest)


def _normalise(obj: Any) -> Any:
  """JSON round trip: tuples become lists, numpy scalars Python numbers."""
  def default(o):
    if isinstance(o, np.generic):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
    raise TypeError(f"manifest value of type {type(o).__name__} is not JSON serialisable")
  return json.loads(json.dumps(obj, default=default))


def _validate_manifest(m: Mapping[str, Any], where: str) -> None:
  if m.get("format") != FORMAT:
    raise StoreError(f"{where}: not an activation store manifest (format {m.get('format')!r}, expected {FORMAT!r})")
  if m.get("version") != VERSION:
    raise StoreError(f"{where}: store format version {m.get('version')} is not supported (this code reads {VERSION})")
  missing = [k for k in REQUIRED_IDENTITY if k not in m.get("identity", {})]
  if missing:
    raise StoreError(f"{where}: manifest identity lacks {missing}; build it with make_manifest")


def _diff(expected: Any, found: Any, prefix: str) -> list[str]:
  if isinstance(expected, dict) and isinstance(found, dict):
    out = []
    for k in sorted(set(expected) | set(found)):
      e, f = expected.get(k, "<missing>"), found.get(k, "<missing>")
      out += _diff(e, f, f"{prefix}.{k}")
    return out
  return [] if expected == found else [f"  {prefix}: expected {expected!r}, found {found!r}"]


def _compare_manifests(expected: dict, found: dict, path: str) -> None:
  lines = _diff(expected["identity"], found["identity"], "identity") + _diff(
      expected["layout"], found["layout"], "layout")
  if lines:
    raise ManifestMismatchError(
        f"activation store {path} was made by a different configuration:\n" + "\n".join(lines) +
        f"\nUse a new store path for this configuration, or delete {path} to collect it again.")


def check_identity(store: Store, **expected: Any) -> None:
  """Refuses a store whose identity/layout fields differ from ``expected``.

  For the trainer: ``check_identity(store, weights_sha256=h, block=b,
  d_in=1280)``. Keys are looked up in the manifest's identity, then layout.
  """
  sections = {**store.manifest["layout"], **store.manifest["identity"]}
  unknown = [k for k in expected if k not in sections]
  if unknown:
    raise StoreError(f"check_identity: the manifest of {store.path} has no fields {unknown}; "
                     f"known fields: {sorted(sections)}")
  lines = [f"  {k}: expected {_normalise(v)!r}, store has {sections[k]!r}"
           for k, v in expected.items() if _normalise(v) != sections[k]]
  if lines:
    raise ManifestMismatchError(
        f"activation store {store.path} does not match what the caller needs:\n" + "\n".join(lines) +
        "\nCollect activations for this model/block/width into a new store, or point to the matching store.")


# --------------------------------------------------------------------------
# Opening


_CONTEXT: ts.Context | None = None


def _context() -> ts.Context:
  # See the module docstring ("File locking") for why locking is off.
  global _CONTEXT
  if _CONTEXT is None:
    _CONTEXT = ts.Context({"file_io_locking": {"mode": "none"}})
  return _CONTEXT


def _acts_spec(path: str, layout: Mapping[str, Any]) -> dict:
  n, t, d = layout["n_maps"], layout["tokens_per_map"], layout["d_in"]
  inner = [_BYTES, *COMPRESSIONS[layout["compression"]], _CRC]
  return {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": os.path.join(path, "acts") + "/"},
      "metadata": {
          "shape": [n, t, d],
          "data_type": layout["dtype"],
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [layout["maps_per_unit"], t, d]}},
          "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
          "fill_value": "NaN",
          "codecs": [{"name": "sharding_indexed", "configuration": {
              "chunk_shape": [layout["maps_per_chunk"], t, d],
              "codecs": inner,
              "index_codecs": [_BYTES, _CRC],
              "index_location": "end"}}],
          "dimension_names": ["map", "token", "channel"],
      },
  }


def _labels_spec(path: str, layout: Mapping[str, Any]) -> dict:
  f = len(layout["label_fields"])
  return {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": os.path.join(path, "labels") + "/"},
      "metadata": {
          "shape": [layout["n_maps"], f],
          "data_type": "int32",
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [layout["maps_per_unit"], f]}},
          "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
          "fill_value": LABEL_FILL,
          "codecs": [_BYTES, _CRC],
          "dimension_names": ["map", "field"],
      },
  }


def _create_json_exclusive(path: str, obj: Any) -> bool:
  """Creates ``path`` with ``obj`` unless it exists; True if this call made it.

  Write to a temp file, then hard-link it to the target: link fails if the
  target exists, so of several racing processes exactly one creates it, and
  nobody ever sees a partial file.
  """
  folder = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
  finally:
    os.unlink(tmp)


def open_store(path: str, manifest: Mapping[str, Any] | None = None, *, create: bool = False) -> Store:
  """Opens the store at ``path``; with ``create=True`` creates it first if absent.

  With a ``manifest`` (from ``make_manifest``) the store on disk must have the
  same identity and layout, else ``ManifestMismatchError`` names each field.
  ``create=True`` opens for writing and is safe to call from several processes
  at once; without it the store is opened read-only.
  """
  path = os.path.abspath(path)
  mpath = os.path.join(path, "manifest.json")
  if manifest is not None:
    manifest = _normalise(manifest)
    _validate_manifest(manifest, "the given manifest")
  if create:
    if manifest is None:
      raise StoreError("open_store(create=True) needs a manifest (see make_manifest)")
    os.makedirs(path, exist_ok=True)
    if not os.path.exists(mpath):
      others = [n for n in os.listdir(path) if not n.startswith(".tmp-")]
      # Re-check after listing: a racing process creates the manifest before anything else.
      if others and not os.path.exists(mpath):
        raise StoreError(
            f"{path} is not empty and has no manifest.json (found {sorted(others)[:5]}): it is not an "
            "activation store; choose a new path")
      _create_json_exclusive(mpath, manifest)
  if not os.path.exists(mpath):
    raise StoreError(
        f"no activation store at {path} (manifest.json missing); collect one first, or create it with "
        "open_store(path, manifest, create=True)")
  found = read_json(mpath)
  _validate_manifest(found, mpath)
  if manifest is not None:
    _compare_manifests(manifest, found, path)
  layout = found["layout"]
  try:
    opts = dict(open=True, create=create, read=True, write=create, context=_context())
    acts = ts.open(_acts_spec(path, layout), **opts).result()
    labels = ts.open(_labels_spec(path, layout), **opts).result()
  except ValueError as e:
    raise StoreError(
        f"the arrays of activation store {path} do not match its manifest or cannot be opened: {e}. "
        f"Delete {path} and collect it again.") from e
  if create:
    os.makedirs(os.path.join(path, "units"), exist_ok=True)
  return Store(path, found, acts, labels, writable=create)


# --------------------------------------------------------------------------
# Units


def unit_rows(store: Store, unit: int) -> tuple[int, int]:
  """Row range ``[start, stop)`` owned by ``unit``."""
  if not 0 <= unit < store.n_units:
    raise StoreError(f"unit {unit} is out of range: the store at {store.path} has units 0..{store.n_units - 1}")
  m = store.maps_per_unit
  return unit * m, min((unit + 1) * m, store.n_maps)


def _marker_path(store: Store, unit: int) -> str:
  return os.path.join(store.path, "units", f"u{unit:08d}.json")


def done_units(store: Store) -> np.ndarray:
  """Sorted ids of the units whose marker exists (completely written)."""
  folder = os.path.join(store.path, "units")
  if not os.path.isdir(folder):
    return np.zeros((0,), np.int64)
  ids = [int(n[1:-5]) for n in os.listdir(folder) if n.startswith("u") and n.endswith(".json")]
  return np.array(sorted(u for u in ids if u < store.n_units), np.int64)


def pending_units(store: Store, process_index: int | None = None, process_count: int | None = None) -> list[int]:
  """Units without a marker that process ``process_index`` of ``process_count`` writes.

  Unit ``u`` belongs to process ``u % process_count``; defaults are
  ``jax.process_index()`` and ``jax.process_count()``.
  """
  if process_index is None or process_count is None:
    import jax  # deferred: writer processes need not start jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise StoreError(f"process_index {process_index} must be in [0, {process_count})")
  done = set(done_units(store).tolist())
  return [u for u in range(process_index, store.n_units, process_count) if u not in done]


def _unit_files(store: Store, unit: int) -> list[tuple[str, str]]:
  """(folder, file name) of the unit's data files (default zarr3 chunk keys)."""
  return [(os.path.join(store.path, "acts", "c", str(unit), "0"), "0"),
          (os.path.join(store.path, "labels", "c", str(unit)), "0")]


def _remove_stale_temps(store: Store, unit: int) -> None:
  for folder, name in _unit_files(store, unit):
    if os.path.isdir(folder):
      for n in os.listdir(folder):
        if n.startswith(name) and n.endswith(".__lock"):
          os.unlink(os.path.join(folder, n))


def _labels_array(store: Store, labels: Any, n: int) -> np.ndarray:
  fields = store.label_fields
  if isinstance(labels, Mapping):
    if set(labels) != set(fields):
      raise StoreError(f"labels must have exactly the fields {list(fields)}, got {sorted(labels)}")
    cols = [np.asarray(labels[f]) for f in fields]
    bad = [f for f, c in zip(fields, cols) if c.shape != (n,)]
    if bad:
      raise StoreError(f"label fields {bad} must have shape ({n},) (one value per map)")
    arr = np.stack(cols, axis=1)
  else:
    arr = np.asarray(labels)
    if arr.shape != (n, len(fields)):
      raise StoreError(f"labels must have shape ({n}, {len(fields)}) for fields {list(fields)}, got {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise StoreError(f"labels must be integers, got dtype {arr.dtype}")
  info = np.iinfo(np.int32)
  if arr.size and (arr.min() <= LABEL_FILL or arr.max() > info.max):
    raise StoreError(f"labels must lie in ({LABEL_FILL}, {info.max}]; {LABEL_FILL} marks unwritten rows")
  return arr.astype(np.int32)


def _checksum(acts: np.ndarray, labels: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(memoryview(np.ascontiguousarray(acts).view(np.uint8).reshape(-1)))
  h.update(memoryview(np.ascontiguousarray(labels, dtype="<i4").view(np.uint8).reshape(-1)))
  return h.hexdigest()


def write_unit(store: Store, unit: int, acts: Any, labels: Any, *, overwrite: bool = False) -> dict:
  """Writes one unit's maps and labels, then its marker; returns the marker.

  ``acts``: (n, tokens_per_map, d_in) or (n, H, W, d_in) with H * W =
  tokens_per_map, float (cast to the store dtype); ``labels``: (n, n_fields)
  ints or a dict field -> (n,). ``n`` is the unit's row count. Non-finite
  values (also after the cast, e.g. float16 overflow) are refused before
  anything is written. A done unit is refused unless ``overwrite``.
  """
  if not store.writable:
    raise StoreError(f"store {store.path} was opened read-only; use open_store(path, manifest, create=True)")
  r0, r1 = unit_rows(store, unit)
  n, t, d = r1 - r0, store.tokens_per_map, store.d_in
  x = np.asarray(acts)
  if x.ndim == 4 and x.shape[1] * x.shape[2] == t:
    x = x.reshape(x.shape[0], t, x.shape[3])
  if x.shape != (n, t, d):
    raise StoreError(f"unit {unit} (rows {r0}-{r1}) needs activations of shape ({n}, {t}, {d}), got {x.shape}")
  lab = _labels_array(store, labels, n)
  with np.errstate(over="ignore"):  # overflow is reported below
    stored = x.astype(store.dtype)
  finite = np.isfinite(stored).reshape(n, -1).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    src_bad = not np.isfinite(np.asarray(x, np.float32)).all()
    why = "contain NaN/Inf" if src_bad else f"overflow {store.layout['dtype']} (use bfloat16)"
    raise StoreError(
        f"unit {unit}: {len(bad)} of {n} maps {why} (first: map {int(bad[0])} = row {r0 + int(bad[0])}); "
        "nothing was written for this unit. Check the sampler (a diverging model or a bad hook).")
  marker_path = _marker_path(store, unit)
  if os.path.exists(marker_path):
    if not overwrite:
      raise StoreError(f"unit {unit} of {store.path} is already complete; pass overwrite=True to rewrite it")
    os.unlink(marker_path)  # the unit is not done while it is being rewritten
  _remove_stale_temps(store, unit)
  try:
    fa = store.acts[r0:r1].write(stored)
    fl = store.labels[r0:r1].write(lab)
    fa.result()
    fl.result()
  except ValueError as e:
    raise StoreError(f"writing unit {unit} (rows {r0}-{r1}) of {store.path} failed: {e}") from e
  marker = {"unit": unit, "rows": [r0, r1], "sha256": _checksum(stored, lab)}
  atomic_write_json(marker_path, marker)
  return marker


class UnitWriter:
  """Writes units from a background thread, so that sampling goes on meanwhile.

  ::

    with UnitWriter(store) as writer:
      for unit in pending_units(store):
        writer.submit(unit, *sample_unit(unit))  # waits while max_in_flight are queued
    # leaving the block waits for every write and raises the first error

  ``acts`` may be jax arrays (copied to the host in the writer thread). A
  crash loses at most the units queued or being written (markers come last).
  """

  def __init__(self, store: Store, max_in_flight: int = 2):
    from concurrent.futures import ThreadPoolExecutor
    self.store = store
    self.max_in_flight = max_in_flight
    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
    self._queue: list[Any] = []

  def submit(self, unit: int, acts: Any, labels: Any, *, overwrite: bool = False) -> None:
    for f in [f for f in self._queue if f.done()]:
      f.result()  # re-raises the error of a failed write
      self._queue.remove(f)
    while len(self._queue) >= self.max_in_flight:
      self._queue.pop(0).result()
    self._queue.append(self._pool.submit(write_unit, self.store, unit, acts, labels, overwrite=overwrite))

  def close(self) -> None:
    """Waits for all queued writes; raises the first error."""
    try:
      for f in self._queue:
        f.result()
    finally:
      self._queue = []
      self._pool.shutdown(wait=True)

  def __enter__(self) -> "UnitWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------
# Reading, checks and summary


def _read_error(store: Store, array: str, r0: int, r1: int, err: Exception) -> StoreError:
  u0, u1 = r0 // store.maps_per_unit, (r1 - 1) // store.maps_per_unit
  units = f"unit {u0}" if u0 == u1 else f"units {u0}-{u1}"
  return StoreError(
      f"cannot read {os.path.join(store.path, array)} rows {r0}-{r1} ({units}): {err}\n"
      f"The unit's file is truncated or corrupt. Run `python -m saemnesia_jax.store verify {store.path} "
      "--repair` to drop the markers of unreadable units, then run the collection again to rewrite them.")


def read_unit(store: Store, unit: int) -> tuple[np.ndarray, np.ndarray]:
  """The stored (acts (n, tokens, d_in) in the store dtype, labels (n, n_fields))."""
  r0, r1 = unit_rows(store, unit)
  try:
    acts = store.acts[r0:r1].read().result()
  except ValueError as e:
    raise _read_error(store, "acts", r0, r1, e) from e
  try:
    labels = store.labels[r0:r1].read().result()
  except ValueError as e:
    raise _read_error(store, "labels", r0, r1, e) from e
  return acts, labels


def verify(store: Store, *, repair: bool = False, progress: bool = True) -> dict:
  """Reads every done unit and checks it against its marker.

  Returns ``{"checked": n, "bad": {unit: reason}, "repaired": [units]}``. With
  ``repair`` the markers of bad units are removed (the store must be writable
  or the markers' folder writable), so the next collection run rewrites them.
  """
  from tqdm import tqdm
  bad: dict[int, str] = {}
  units = done_units(store)
  for u in tqdm(units.tolist(), desc="verify", disable=not progress):
    try:
      marker = read_json(_marker_path(store, u))
      acts, labels = read_unit(store, u)
    except (StoreError, ValueError, OSError) as e:
      bad[u] = str(e).splitlines()[0]
      continue
    r0, r1 = unit_rows(store, u)
    if marker.get("rows") != [r0, r1]:
      bad[u] = f"marker rows {marker.get('rows')} != {[r0, r1]}"
    elif not np.isfinite(acts).all():
      bad[u] = "activations contain NaN/Inf (a missing file reads as NaN)"
    elif (labels == LABEL_FILL).any():
      bad[u] = "labels missing"
    elif _checksum(acts, labels) != marker.get("sha256"):
      bad[u] = "sha256 differs from the marker"
  repaired = []
  if repair:
    for u in bad:
      os.unlink(_marker_path(store, u))
      repaired.append(u)
  return {"checked": int(len(units)), "bad": bad, "repaired": repaired}


def _done_rows_mask(store: Store, units: np.ndarray) -> np.ndarray:
  mask = np.zeros((store.n_maps,), bool)
  m = store.maps_per_unit
  for u in units.tolist():
    mask[u * m:min((u + 1) * m, store.n_maps)] = True
  return mask


def read_labels(store: Store) -> tuple[np.ndarray, np.ndarray]:
  """(labels (n_maps, n_fields) int32, mask of rows in done units).

  Raises ``StoreError`` naming the unit when a done unit's labels are
  unreadable or were never written.
  """
  units = done_units(store)
  mask = _done_rows_mask(store, units)
  try:
    labels = store.labels.read().result()
  except ValueError:
    labels = np.full((store.n_maps, len(store.label_fields)), LABEL_FILL, np.int32)
    for u in units.tolist():  # find the culprit
      r0, r1 = unit_rows(store, u)
      try:
        labels[r0:r1] = store.labels[r0:r1].read().result()
      except ValueError as e:
        raise _read_error(store, "labels", r0, r1, e) from e
  missing = mask & (labels == LABEL_FILL).any(axis=1)
  if missing.any():
    r = int(np.flatnonzero(missing)[0])
    raise _read_error(store, "labels", r, r + 1, StoreError("labels of a completed unit are missing"))
  return labels, mask


def _names(store: Store, key: str) -> list[str] | None:
  grid = store.manifest["identity"].get("prompt_grid")
  names = grid.get(key) if isinstance(grid, dict) else None
  return list(names) if isinstance(names, list) else None


def summary(store: Store) -> dict:
  """Counts of stored maps per object, style, timestep and step; units done."""
  labels, mask = read_labels(store)
  done = labels[mask]
  fields = store.label_fields

  def counts(field: str, names: list[str] | None) -> dict[str, int]:
    if field not in fields:
      return {}
    vals, cnt = np.unique(done[:, fields.index(field)], return_counts=True)
    def name(v: int) -> str:
      if names is not None and 0 <= v < len(names):
        return names[v]
      return "(none)" if v == -1 else str(v)
    return {name(int(v)): int(c) for v, c in zip(vals, cnt)}

  size = 0
  for root, _, files in os.walk(store.path):
    size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  maps = int(mask.sum())
  return {
      "path": store.path,
      "units_done": int(len(done_units(store))), "units_total": store.n_units,
      "maps_done": maps, "maps_total": store.n_maps,
      "tokens_done": maps * store.tokens_per_map,
      "bytes_on_disk": size,
      "bytes_per_token": size / max(1, maps * store.tokens_per_map),
      "per_object": counts("object", _names(store, "objects")),
      "per_style": counts("style", _names(store, "styles")),
      "per_timestep": counts("timestep", None),
      "per_step": counts("step", None),
  }


def format_summary(s: Mapping[str, Any]) -> str:
  """A printable form of ``summary``: counts in maps."""
  lines = [
      f"activation store {s['path']}",
      f"  units {s['units_done']}/{s['units_total']}, maps {s['maps_done']}/{s['maps_total']}, "
      f"tokens {s['tokens_done']:,}, {s['bytes_on_disk'] / 1e6:.2f} MB on disk "
      f"({s['bytes_per_token']:.1f} B/token)",
  ]
  for key in ("per_object", "per_style", "per_timestep", "per_step"):
    if s[key]:
      lines.append(f"  maps {key.replace('_', ' ')}:")
      lines += [f"    {k:>24s} {v:8d}" for k, v in s[key].items()]
  return "\n".join(lines)


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
      prefetch: bool = True,
      state: Mapping[str, Any] | None = None,
  ):
    if process_index is None or process_count is None:
      import jax
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

  def _fetch(self, rows: np.ndarray, rng_key: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reads a buffer's chunks; returns its items (shuffled, ``dtype``) and their ids."""
    s = self.store
    mpc = s.maps_per_chunk
    segments = self._segments(rows)
    futures = [s.acts[c * mpc:min((c + 1) * mpc, s.n_maps)].read() for _, _, c in segments]
    data = np.empty((len(rows), s.tokens_per_map, s.d_in), s.dtype)
    for (a, b, c), fut in zip(segments, futures):
      r0 = c * mpc
      try:
        block = fut.result()
      except ValueError as e:
        raise _read_error(s, "acts", r0, min(r0 + mpc, s.n_maps), e) from e
      lo, hi = int(rows[a]) - r0, int(rows[b - 1]) - r0 + 1
      data[a:b] = block[lo:hi] if hi - lo == b - a else block[rows[a:b] - r0]
    finite = np.isfinite(data).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
      r = int(rows[np.flatnonzero(~finite)[0]])
      raise _read_error(s, "acts", r, r + 1, StoreError(
          "non-finite values (NaN/Inf; a missing file reads as NaN)"))
    if self._items_per_map > 1:
      t = s.tokens_per_map
      data = data.reshape(len(rows) * t, s.d_in)
      ids = (rows[:, None] * t + np.arange(t)[None, :]).reshape(-1)
    else:
      ids = rows
    if self.shuffle:  # permute in the (narrow) store dtype, then cast once
      perm = np.random.default_rng(rng_key).permutation(len(ids))
      data, ids = data[perm], ids[perm]
    return data.astype(self.dtype, copy=False), ids

  def _epoch_batches(self, epoch: int, start: int, plan: tuple[list[np.ndarray], int]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    bufs, nb = plan
    if start >= nb:
      return
    b = self.local_batch_size
    ends = np.cumsum([len(r) * self._items_per_map for r in bufs])
    k = int(np.searchsorted(ends, start * b, side="right"))  # buffer holding the first item
    skip = start * b - (int(ends[k - 1]) if k else 0)

    def fetch(j: int):
      return self._fetch(bufs[j], [self.seed, epoch, j, self.process_index])

    pending = None  # the next buffer, read by a background thread
    cur_x, cur_i, pos = None, np.zeros((0,), np.int64), 0
    for i in range(start, nb):
      want = b if (i < nb - 1 or self.drop_remainder) else int(ends[-1]) - i * b
      xs, ids = [], []
      while want:
        if pos == len(cur_i):
          cur_x, cur_i = pending.result() if pending is not None else fetch(k)
          cur_x, cur_i, pos, skip = cur_x[skip:], cur_i[skip:], 0, 0
          k += 1
          pending = self._pool().submit(fetch, k) if self.prefetch and k < len(bufs) else None
        take = min(want, len(cur_i) - pos)
        xs.append(cur_x[pos:pos + take])
        ids.append(cur_i[pos:pos + take])
        pos += take
        want -= take
      # Views into the buffer when the batch lies in one buffer; else one small copy.
      yield (xs[0], ids[0]) if len(xs) == 1 else (np.concatenate(xs), np.concatenate(ids))

  def _pool(self):
    if self._executor is None:
      from concurrent.futures import ThreadPoolExecutor
      self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-prefetch")
    return self._executor

  def _item_shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  def _stream(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    epoch, batch = self._epoch, self._batch
    while self.num_epochs is None or epoch < self.num_epochs:
      plan = self._plan(epoch)
      nb = plan[1]
      if nb == 0:
        raise StoreError(
            f"batch_size {self.batch_size} is larger than the selected data ({len(self.rows)} maps): "
            "use a smaller batch or select more maps")
      for x, ids in self._epoch_batches(epoch, batch, plan):
        batch += 1
        self._epoch, self._batch = (epoch + 1, 0) if batch >= nb else (epoch, batch)
        yield x, ids
      epoch, batch = epoch + 1, 0

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
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  def put(x):
    x = np.asarray(x)
    s = sharding
    if isinstance(s, NamedSharding) and len(s.spec) > x.ndim:
      s = NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[:x.ndim]))
    return jax.make_array_from_process_local_data(s, x)

  return jax.tree.map(put, batch)


# --------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m saemnesia_jax.store", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p_sum = sub.add_parser("summary", help="counts per concept and per timestep")
  p_sum.add_argument("path")
  p_sum.add_argument("--json", action="store_true", help="print the summary as JSON")
  p_ver = sub.add_parser("verify", help="read every completed unit and check it against its marker")
  p_ver.add_argument("path")
  p_ver.add_argument("--repair", action="store_true", help="drop the markers of bad units")
  args = parser.parse_args(argv)
  if args.cmd == "summary":
    s = summary(open_store(args.path))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0
  store = open_store(args.path)
  report = verify(store, repair=args.repair)
  print(f"checked {report['checked']} units, {len(report['bad'])} bad")
  for u, why in sorted(report["bad"].items()):
    print(f"  unit {u}: {why}")
  if report["repaired"]:
    print(f"removed {len(report['repaired'])} markers; run the collection again to rewrite those units")
  return 1 if report["bad"] and not args.repair else 0


if __name__ == "__main__":
  sys.exit(main())
