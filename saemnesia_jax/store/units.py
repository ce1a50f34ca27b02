"""Units of an activation store: writing, completion markers, checks, summary.

* Completion. A unit is done only when its marker exists. ``write_unit``
  writes the data, waits for it to be on disk, then writes the marker
  atomically. A crash at any point loses at most the unit in flight: it has no
  marker and is rewritten, whole, by the next run. ``pending_units(store,
  process_index, process_count)`` lists the units without a marker with
  ``unit % process_count == process_index`` (defaults from ``jax``), so
  several hosts fill disjoint parts of one store, and a store written by two
  processes is byte-identical to one written by one. ``UnitWriter`` runs
  ``write_unit`` in a background thread so that sampling continues meanwhile.

``verify`` reads every completed unit back and compares it with the sha256 in
its marker; ``--repair`` drops the markers of bad units so that the next
collection run rewrites them.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from saemnesia_jax.runtime.io_utils import atomic_write_json, read_json, write_point
from saemnesia_jax.store.format import LABEL_FILL, Store, StoreError

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
    write_point()  # the test hook may kill the process while both writes are in flight
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
