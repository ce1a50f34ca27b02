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
    # mkstemp makes the file private (0600); give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


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
