"""Run identity: every stage's output folder records what determines it.

``fingerprint.json`` in an output folder holds the settings the stage read
(the config fields that can change its result) and the identity of its
inputs (hashes of the model weights, the SAE, the scores, the store
manifest). Before it does any work a stage calls ``begin``:

* no fingerprint and no outputs: a new run; the fingerprint is written;
* the same fingerprint: the run continues (or has nothing left to do);
* only fields the stage can continue with differ (``continuable``, e.g.
  ``train.steps``): it continues, says so, and records the new values;
* anything else differs: ``RunMismatchError`` lists each field (old -> new)
  and says how to start fresh; with ``overwrite=True`` the old outputs are
  deleted and the run starts again.

``overwrite`` deletes only a folder whose ``fingerprint.json`` says this
project made it for this stage; never a folder without one (it holds files
someone else put there), the workdir, a folder above it, the store, the
current directory or the home folder (``keep``): those are refused with a
``RunMismatchError`` and nothing is touched.

Fields that cannot change a result (progress, logging, number of processes,
checkpoint cadence, output paths) are left out by each stage's ``exclude``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Mapping

from saemnesia_jax.runtime import config_docs
from saemnesia_jax.runtime.errors import RunMismatchError
from saemnesia_jax.runtime.io_utils import atomic_write_json, hash_files, read_json

FILE = "fingerprint.json"


def itstime(step: int, every: int, total: int) -> bool:
  """A loop's cadence: every ``every`` steps, and at the last step ``total``."""
  return (every > 0 and step % every == 0) or step == total


def overwrite(config: Any) -> bool:
  """``config.overwrite`` (False where a hand-built config has no such field)."""
  return bool(config.get("overwrite", False))


def _plain(v: Any) -> Any:
  return json.loads(json.dumps(v, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def read_json_or_none(path: str) -> Any:
  """A JSON file's object, or None where it is truncated or not JSON."""
  try:
    return read_json(path)
  except (OSError, ValueError):
    return None


def settings(config: Any, reads: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
  """``{"section.field": value}`` of the fields under ``reads``, less ``exclude``
  (a field, or a section with everything under it)."""
  flat = config_docs.flat_fields(config)
  exclude = tuple(exclude)
  keep = [k for k in config_docs.selected(flat, reads)
          if not any(k == e or k.startswith(e + ".") for e in exclude)]
  return {k: _plain(flat[k]) for k in keep}


def json_hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(_plain(obj), sort_keys=True).encode()).hexdigest()


def sae_hash(sae_dir: str) -> str:
  """The identity of an SAE export: its weights and config files."""
  files = [os.path.join(sae_dir, f) for f in ("cfg.json", "sae.safetensors")]
  return hash_files([f for f in files if os.path.isfile(f)])


def store_identity(manifest: Mapping[str, Any], units_done: int | None = None) -> dict[str, Any]:
  """What identifies a store's contents: its manifest's identity and layout
  (hashed), and how many of its units are written."""
  out = {"store": json_hash({"identity": manifest["identity"], "layout": manifest["layout"]})}
  if units_done is not None:
    out["store_units_done"] = int(units_done)
  return out


def make(config: Any, reads: Iterable[str], exclude: Iterable[str] = (),
         inputs: Mapping[str, Any] | None = None, stage: str = "") -> dict[str, Any]:
  return {"stage": stage, "settings": settings(config, reads, exclude), "inputs": _plain(dict(inputs or {}))}


def _flat(fp: Mapping[str, Any]) -> dict[str, Any]:
  return {**fp.get("settings", {}), **{f"input:{k}": v for k, v in fp.get("inputs", {}).items()}}


def _short(v: Any) -> str:
  s = json.dumps(v)
  return s if len(s) <= 40 else s[:18] + "..." + s[-18:]


# Fields added after runs were recorded: absent from a record, they count as at these defaults.
LATER_FIELDS = {"sae.selection": "auto"}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  a, b = _flat(old), _flat(new)
  get = lambda d, k: d.get(k, LATER_FIELDS.get(k, "<absent>"))  # noqa: E731
  return {k: (get(a, k), get(b, k)) for k in sorted(set(a) | set(b)) if get(a, k) != get(b, k)}


def _change(old: Any, new: Any) -> str:
  if isinstance(old, list) and isinstance(new, list):
    # Long lists (evaluate.variants) shorten to the same text both sides:
    # name the entries that came and went instead.
    added = [f"+{_short(x)}" for x in new if x not in old]
    gone = [f"-{_short(x)}" for x in old if x not in new]
    if added or gone:
      return " ".join(gone + added)
  return f"{_short(old)} -> {_short(new)}"


def describe(diffs: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} {_change(o, n)}" for k, (o, n) in diffs.items())


def _inside(path: str, folder: str) -> bool:
  """Whether ``path`` is ``folder`` or under it (as written, or with links resolved)."""
  for a, b in ((os.path.abspath(path), os.path.abspath(folder)), (os.path.realpath(path), os.path.realpath(folder))):
    if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
      return True
  return False


def deletable(out_dir: str, old: Mapping[str, Any] | None, stage: str, keep: Iterable[str] = ()) -> str:
  """'' if ``overwrite`` may delete ``out_dir`` (its record ``old`` says this
  project made it for ``stage``), else why not."""
  if old is None:
    return f"it holds files without a {FILE}, so not a run this project made"
  if not isinstance(old, Mapping) or not stage or old.get("stage") != stage:
    found = old.get("stage") if isinstance(old, Mapping) else None
    return f"its {FILE} is not a {stage or 'this stage'}'s run (stage {found!r})"
  guarded = [p for p in (*keep, os.getcwd(), os.path.expanduser("~")) if p]
  for p in guarded:
    if _inside(p, out_dir):
      return f"it is or holds {p}"
  if os.path.realpath(out_dir) == os.sep:
    return "it is the root folder"
  return ""


def begin(out_dir: str, fp: Mapping[str, Any], *, overwrite: bool = False, continuable: Iterable[str] = (),
          fresh: str = "a new --config.workdir", outputs_exist: bool | None = None,
          write: bool = True, keep: Iterable[str] = ()) -> str:
  """Checks ``out_dir`` against ``fp`` (see the module docstring).

  Returns 'new', 'same' or 'continued'. ``fresh`` names the setting that
  starts a run elsewhere (e.g. '--config.train.name=<new name>').
  ``outputs_exist``: whether the folder holds outputs without a fingerprint
  (default: it exists and is not empty). ``write=False`` (processes other
  than 0) checks without writing. ``keep``: folders ``overwrite`` must never
  delete (nor a folder holding them): the workdir, the store, the model.
  """
  path = os.path.join(out_dir, FILE)
  fp = _plain(dict(fp))
  old = None
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise RunMismatchError(f"{out_dir} is a file, not a run folder: start a fresh run with {fresh}")
  if os.path.isfile(path):
    old = read_json_or_none(path)
    if old is None:
      raise RunMismatchError(f"{path} is not a readable run record: delete it (and the run's outputs) "
                             f"or start a fresh run with {fresh}")
    diffs = differences(old, fp)
    if not diffs:
      return "same"
    continuable = tuple(continuable)
    if all(any(k == c or k.startswith(c + ".") for c in continuable) for k in diffs) and not overwrite:
      print(f"{out_dir}: continuing with changed settings: {describe(diffs)}")
      if write:
        atomic_write_json(path, fp)
      return "continued"
    reason = f"{out_dir} was made with other settings: {describe(diffs)}"
  else:
    if outputs_exist is None:
      outputs_exist = os.path.isdir(out_dir) and any(not n.startswith(".") for n in os.listdir(out_dir))
    if not outputs_exist:
      if write:
        atomic_write_json(path, fp)
      return "new"
    reason = f"{out_dir} holds outputs without a record of their settings ({FILE})"
  if not overwrite:
    raise RunMismatchError(
        f"{reason}.\nStart a fresh run with {fresh}, or add --config.overwrite=True to delete it and "
        "start again.")
  why_not = deletable(out_dir, old, str(fp.get("stage", "")), keep)
  if why_not:
    raise RunMismatchError(f"{reason}.\noverwrite refuses to delete {out_dir}: {why_not}; start a fresh run "
                           f"with {fresh} (or move the folder away yourself)")
  print(f"overwrite: deleting {out_dir} ({reason})")
  if write:
    shutil.rmtree(out_dir, ignore_errors=True)
    atomic_write_json(path, fp)
  return "new"
