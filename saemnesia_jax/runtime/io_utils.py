"""Small file helpers shared by every stage: atomic writes and manifests.

Every stage writes its outputs so that a crash never leaves a half-written
file behind: data goes to a temporary file in the same folder, then is renamed
over the target (rename is atomic on POSIX file systems).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np


def usual_mode(path: str) -> None:
  """mkstemp makes a file private (0600); give it what open() would (0666 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file + fsync + rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    usual_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def dumps(obj: Any, *, indent: int | None = None, nonfinite_as_null: bool = False, where: str = "") -> str:
  """Strict JSON (no NaN or Infinity, which JSON does not have): a non-finite
  number is a ValueError naming ``where``, or with ``nonfinite_as_null`` null."""
  if nonfinite_as_null:
    obj = _finite_or_none(obj)
  try:
    return json.dumps(obj, indent=indent, sort_keys=True, default=_json_default, allow_nan=False)
  except ValueError as e:
    if "Out of range float" not in str(e):
      raise
    raise ValueError(f"{where or 'JSON'}: a value is not a finite number (NaN or inf); JSON has none") from e


def _finite_or_none(obj: Any) -> Any:
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.ndarray):
    return _finite_or_none(obj.tolist())
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  return obj


def atomic_write_json(path: str, obj: Any) -> None:
  """``obj`` as strict JSON (``dumps``), written atomically."""
  atomic_write_bytes(path, (dumps(obj, indent=2, where=path) + "\n").encode())


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _json_default(o):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (set, frozenset, tuple)):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def hash_files(paths: list[str], chunk: int = 1 << 20) -> str:
  """SHA-256 over the contents of ``paths`` (in the given order)."""
  h = hashlib.sha256()
  for p in paths:
    h.update(os.path.basename(p).encode())
    with open(p, "rb") as f:
      while block := f.read(chunk):
        h.update(block)
  return h.hexdigest()
