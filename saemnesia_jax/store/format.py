"""The activation store's format: layout on disk, manifest, and opening.

One captured denoising step of one UNet block is a *map*: an array
(tokens_per_map, d_in) (16 x 16 = 256 tokens x 1280 channels at SD scale,
8 x 8 = 64 x 64 on the miniature), plus integer labels (``LABEL_FIELDS``:
object id, style id (-1: none), scheduler timestep, step index, prompt id,
seed). ``saemnesia_jax.store`` is the entry point (it re-exports this module,
``store_units`` and ``reader``).

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
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import dumps, read_json, usual_mode, write_point

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
class ShapeRecord:
  """What a trainer needs to know of a store to build its step: the map shape,
  the dtype batches arrive in and the prompt grid (concept names). A dry run
  builds one from the model's config files alone, before anything is collected."""
  d_in: int
  tokens_per_map: int
  dtype: np.dtype
  objects: tuple[str, ...]
  styles: tuple[str, ...]
  block: str
  path: str = "(none)"


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
  def shape(self) -> ShapeRecord:
    identity = self.manifest["identity"]
    grid = identity["prompt_grid"]
    return ShapeRecord(self.d_in, self.tokens_per_map, self.dtype, tuple(grid["objects"]), tuple(grid["styles"]),
                       identity.get("block", ""), self.path)

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

  Measured: chunk-aligned reads ran at about 400 MB/s with chunks of
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
      f.write((dumps(obj, indent=2, where=path) + "\n").encode())
      f.flush()
      os.fsync(f.fileno())
    usual_mode(tmp)  # the manifest reads like the store's other files (0644 under umask 022)
    write_point()
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
  try:
    found = read_json(mpath)
  except ValueError as e:
    raise StoreError(f"{mpath} is truncated or not JSON ({e}): the store's record is damaged; collect the "
                     "store again into a new path") from e
  if not isinstance(found, dict):
    raise StoreError(f"{mpath}: not an activation store manifest (a JSON {type(found).__name__})")
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
