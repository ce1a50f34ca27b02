"""Resumable work units for batch evaluation on one host or several.

A *unit* is one piece of evaluation work, named by a dict of JSON-able fields,
e.g. ``{"method": "saemnesia", "concept": "Disk", "domain": "object",
"gamma": -10.0, "seeds": [188, 288]}``. Its result (a JSON-able dict) is
stored as ``<root>/units/<unit_id>.json`` together with the unit's fields.

* Identity: ``unit_id`` hashes the canonical JSON of the fields (sorted keys,
  no NaN), so the same fields give the same id in every process and every run.
  ``-10`` and ``-10.0`` are different fields (JSON keeps the difference).
* Sharing: ``assign(units, i, n)`` gives process i the units at positions
  i, i + n, i + 2n, ... of the list: a disjoint cover, the same in every
  process that builds the same list. Assign first, then drop the done units
  (``results.pending(assign(units))``): assigning the pending list instead
  would depend on when each process looked at the shared folder.
* Crash safety: a result is written to a temporary file in the same folder and
  renamed into place (``io_utils.atomic_write_bytes``), so ``units/`` only
  ever holds whole results. A temp file left by a killed writer starts with
  ``.tmp-``: every reader ignores it and the next ``write`` of that unit
  removes it. A rerun does only the units without a result file.
* Merging: ``merge`` reads every result file, sorts by the canonical JSON of
  the fields and writes ``<root>/results.json`` atomically; the bytes depend
  only on the set of results, not on which process wrote which.

Several processes: ``launch/`` starts one process per host (or several on
one machine) with ``SAEMNESIA_COORDINATOR``, ``SAEMNESIA_NUM_PROCESSES`` and
``SAEMNESIA_PROCESS_ID`` set; ``initialize_distributed()`` turns them into a
``jax.distributed`` run (see launch/README.md).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, atomic_write_json, read_json

ENV_COORDINATOR = "SAEMNESIA_COORDINATOR"
ENV_NUM_PROCESSES = "SAEMNESIA_NUM_PROCESSES"
ENV_PROCESS_ID = "SAEMNESIA_PROCESS_ID"
ENV_AUTO = "SAEMNESIA_AUTO_DISTRIBUTED"
ENV_INIT_TIMEOUT = "SAEMNESIA_INIT_TIMEOUT"  # seconds to wait for every process (default 300)

UNITS_DIR = "units"
RESULTS_FILE = "results.json"
ARRAYS = "arrays"  # result key: {name: numpy array} stored beside the JSON in <id>.npz
_TMP_PREFIX = ".tmp-"  # io_utils.atomic_write_bytes' temp files: .tmp-<random><name>
_HASH_CHARS = 12
_PREFIX_CHARS = 48


class UnitsError(UserError):
  """Bad unit fields, a damaged result file, or missing results."""


# ------------------------------------------------------------------ identity


def _canonical_json(fields: Mapping[str, Any]) -> str:
  if not isinstance(fields, Mapping):
    raise UnitsError(f"a unit is a dict of JSON-able fields, got {type(fields).__name__}")
  bad = [k for k in fields if not isinstance(k, str)]
  if bad:
    raise UnitsError(f"unit field names must be strings, got {bad!r}")
  try:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      default=_json_default)
  except (TypeError, ValueError) as e:
    raise UnitsError(f"unit {dict(fields)!r} is not canonical JSON ({e}): use str, int, float (finite), "
                     f"bool, None, lists and dicts") from e


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def canonical(fields: Mapping[str, Any]) -> dict[str, Any]:
  """The fields as they read back from JSON (tuples -> lists, numpy ->
  Python numbers): what ``UnitResults`` stores and returns."""
  return json.loads(_canonical_json(fields))


def unit_id(fields: Mapping[str, Any]) -> str:
  """A stable file-name-safe id: the field values (sorted by key, scalars
  only, at most 48 characters) and 12 hex digits of the SHA-256 of the
  canonical JSON, e.g. ``Disk_object_-10.0_saemnesia_1f0c2b7a9d3e``."""
  text = _canonical_json(fields)
  digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]
  parts = [re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)) for _, v in sorted(fields.items())
           if isinstance(v, (str, int, float, bool))]
  prefix = "_".join(p for p in parts if p)[:_PREFIX_CHARS]
  # A name must not start with '-' (read as an option) or '.' (hidden, and
  # the temp files' prefix).
  if not prefix[:1].isalnum():
    prefix = "unit_" + prefix if prefix else "unit"
  return f"{prefix}_{digest}"


# ---------------------------------------------------------------- assignment


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # deferred: reading and merging unit results needs no JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UnitsError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def assign(units: Sequence[Mapping[str, Any]], process_index: int | None = None,
           process_count: int | None = None) -> list[Mapping[str, Any]]:
  """This process's share of ``units``: positions ``process_index``,
  ``process_index + process_count``, ... (defaults: ``jax.process_index()``,
  ``jax.process_count()``). Every unit goes to exactly one process; the same
  list gives the same split everywhere. Repeated units are an error."""
  pi, pc = _process(process_index, process_count)
  ids = [unit_id(u) for u in units]
  if len(set(ids)) != len(ids):
    seen, dup = set(), []
    for u, i in zip(units, ids):
      if i in seen:
        dup.append(dict(u))
      seen.add(i)
    raise UnitsError(f"{len(dup)} unit(s) appear twice in the list, e.g. {dup[0]!r}: each unit once")
  return list(units[pi::pc])


# ------------------------------------------------------------------- storage


class UnitResults:
  """The result files of one batch of units under ``root/units/``."""

  def __init__(self, root: str):
    self.root = root
    self.dir = os.path.join(root, UNITS_DIR)
    os.makedirs(self.dir, exist_ok=True)

  def path(self, unit: Mapping[str, Any]) -> str:
    return os.path.join(self.dir, unit_id(unit) + ".json")

  def done(self, unit: Mapping[str, Any]) -> bool:
    """Whether the unit has a (whole) result file."""
    return os.path.isfile(self.path(unit))

  def pending(self, units: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The units of ``units`` without a result, in the given order."""
    return [u for u in units if not self.done(u)]

  def write(self, unit: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """Stores ``result`` (a JSON-able dict) beside the unit's fields,
    atomically; a stale temp file of this unit is removed first. Returns the
    path. Numpy arrays under ``result[ARRAYS]`` (e.g. image features, too
    large for JSON) go to ``<id>.npz``, written before the JSON that marks the
    unit done; ``read_arrays`` returns them."""
    if not isinstance(result, Mapping):
      raise UnitsError(f"a unit result is a dict, got {type(result).__name__}")
    uid = unit_id(unit)
    result = dict(result)
    arrays = result.pop(ARRAYS, None)
    if arrays:
      buf = io.BytesIO()
      np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
      atomic_write_bytes(os.path.join(self.dir, uid + ".npz"), buf.getvalue())
      result[ARRAYS] = sorted(arrays)
    for stale in glob.glob(os.path.join(glob.escape(self.dir), f"{_TMP_PREFIX}*{uid}.*")):
      try:
        os.unlink(stale)
      except FileNotFoundError:
        pass
    path = os.path.join(self.dir, uid + ".json")
    atomic_write_json(path, {"id": uid, "unit": canonical(unit), "result": dict(result)})
    return path

  def _load(self, path: str) -> dict[str, Any]:
    try:
      rec = read_json(path)
    except (OSError, ValueError) as e:
      raise UnitsError(f"unit result {path} cannot be read ({e}): delete it and rerun to redo the unit") from e
    name = os.path.basename(path)[:-len(".json")]
    if (not isinstance(rec, dict) or set(rec) != {"id", "unit", "result"} or rec["id"] != name
        or unit_id(rec["unit"]) != name):
      raise UnitsError(f"{path} is not a unit result of this module (its id, fields or name disagree): "
                       f"delete it and rerun to redo the unit")
    return rec

  def read(self, unit: Mapping[str, Any]) -> dict[str, Any]:
    """The stored result of ``unit``; UnitsError if it has none."""
    path = self.path(unit)
    if not os.path.isfile(path):
      raise UnitsError(f"unit {canonical(unit)!r} has no result yet ({path})")
    return self._load(path)["result"]

  def read_arrays(self, unit: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays stored with ``unit``'s result ({} if it stored none)."""
    names = self.read(unit).get(ARRAYS)
    if not names:
      return {}
    path = os.path.join(self.dir, unit_id(unit) + ".npz")
    try:
      with np.load(path) as f:
        return {k: f[k] for k in names}
    except (OSError, KeyError, ValueError) as e:
      raise UnitsError(f"the arrays of unit result {self.path(unit)} cannot be read from {path} ({e}): delete "
                       "both files and rerun to redo the unit") from e

  def records(self) -> list[dict[str, Any]]:
    """Every stored ``{"id", "unit", "result"}``, sorted by the canonical
    JSON of the unit fields; temp files are ignored."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(self.dir), "*.json"))
             if not os.path.basename(p).startswith(".")]
    recs = [self._load(p) for p in paths]
    return sorted(recs, key=lambda r: _canonical_json(r["unit"]))

  def all(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every stored (fields, result) pair, sorted as in ``records``."""
    return [(r["unit"], r["result"]) for r in self.records()]


def merge(root: str, units: Sequence[Mapping[str, Any]] | None = None,
          path: str | None = None) -> list[dict[str, Any]]:
  """Collects the results under ``root`` into ``path`` (default
  ``root/results.json``), written atomically, and returns its list of
  ``{"id", "unit", "result"}`` (sorted by the canonical JSON of the fields).

  With ``units``: only those, and a UnitsError if any has no result yet.
  Without: every result found. The file's bytes depend only on the results.
  """
  res = UnitResults(root)
  recs = res.records()
  if units is not None:
    want = {unit_id(u) for u in units}
    have = {r["id"] for r in recs}
    missing = [canonical(u) for u in units if unit_id(u) not in have]
    if missing:
      raise UnitsError(f"{len(missing)} of {len(want)} units have no result under {res.dir}, e.g. "
                       f"{missing[0]!r}: run the evaluation again (it does only the missing units)")
    recs = [r for r in recs if r["id"] in want]
  atomic_write_json(path or os.path.join(root, RESULTS_FILE), {"n_units": len(recs), "units": recs})
  return recs


# ------------------------------------------------------------ several hosts


def _env_int(name: str) -> int:
  raw = os.environ.get(name, "")
  try:
    return int(raw)
  except ValueError:
    raise UnitsError(f"{ENV_COORDINATOR} is set, so {name} must be an integer, got {raw!r}: the launch "
                     f"scripts in launch/ set all three") from None


def _cpu_platform() -> bool:
  # The backend is not up yet (it must not be, before jax.distributed), so go
  # by the requested platforms; unset counts as CPU, since the gloo setting
  # only concerns the CPU client and is harmless on GPU and TPU.
  import jax  # deferred: reading and merging unit results needs no JAX
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return not platforms or platforms.split(",")[0].strip().lower() == "cpu"


def initialize_distributed() -> bool:
  """Starts ``jax.distributed`` from the environment; returns whether this
  is a multi-process run. Call it first, before anything touches a device.

  * ``SAEMNESIA_COORDINATOR=host:port`` (with ``SAEMNESIA_NUM_PROCESSES`` and
    ``SAEMNESIA_PROCESS_ID``): ``jax.distributed.initialize`` with these;
    on CPU, gloo collectives first.
  * else ``SAEMNESIA_AUTO_DISTRIBUTED=1``: ``jax.distributed.initialize()``
    with no arguments (TPU pods, where jax finds its peers itself).
  * else nothing: one process.

  Idempotent: a second call (or one after the caller initialised
  jax.distributed itself) does nothing.
  """
  import jax  # deferred: reading and merging unit results needs no JAX
  coord = os.environ.get(ENV_COORDINATOR, "").strip()
  auto = os.environ.get(ENV_AUTO, "").strip().lower() in ("1", "true", "yes")
  if not coord and not auto:
    return jax.distributed.is_initialized()
  if jax.distributed.is_initialized():
    return True
  if not coord:
    jax.distributed.initialize()
    return True
  if not re.fullmatch(r"\[?[^\s]+\]?:\d+", coord):
    raise UnitsError(f"{ENV_COORDINATOR}={coord!r} must be host:port, e.g. 127.0.0.1:12345")
  n, i = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
  if n < 1 or not 0 <= i < n:
    raise UnitsError(f"{ENV_PROCESS_ID}={i} must be in [0, {ENV_NUM_PROCESSES}={n})")
  if _cpu_platform() and hasattr(jax.config, "jax_cpu_collectives_implementation"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = int(os.environ.get(ENV_INIT_TIMEOUT, "300"))
  jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=i,
                             initialization_timeout=timeout)
  return True


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)``; no-op alone."""
  import jax  # deferred: reading and merging unit results needs no JAX
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # deferred: JAX, as above
    multihost_utils.sync_global_devices(name)


def run_units(root: str, units: Sequence[Mapping[str, Any]], fn: Callable[[Mapping[str, Any]], Mapping[str, Any]],
              process_index: int | None = None, process_count: int | None = None,
              progress: bool = True) -> int:
  """Computes and stores ``fn(unit)`` for this process's pending units (see
  ``assign``); returns how many it computed. Resumes: done units are skipped."""
  pi, pc = _process(process_index, process_count)
  res = UnitResults(root)
  todo = res.pending(assign(units, pi, pc))
  for u in tqdm(todo, desc=f"units (process {pi}/{pc})", disable=not progress):
    res.write(u, fn(u))
  return len(todo)


def gather(root: str, units: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
  """After every process has run its units: process 0 merges (``merge``),
  the others wait for it; every process returns the merged list. ``root``
  must be one shared folder (NFS, a bucket mount) seen by every process."""
  import jax  # deferred: reading and merging unit results needs no JAX
  barrier("saemnesia-units-written")
  if units is not None:  # every write has finished: all processes see the same files
    missing = UnitResults(root).pending(units)
    if missing:
      raise UnitsError(f"{len(missing)} of {len(units)} units have no result under {root}, e.g. "
                       f"{canonical(missing[0])!r}: run the evaluation again (it does only the missing units)")
  error = None
  if jax.process_index() == 0:
    try:
      merge(root, units)
    except Exception as e:  # reach the barrier anyway, so the others do not hang
      error = e
  barrier("saemnesia-units-merged")
  if error is not None:
    raise error
  return read_json(os.path.join(root, RESULTS_FILE))["units"]
