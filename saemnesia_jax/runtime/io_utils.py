"""Small file helpers shared by every stage: atomic writes and manifests.

Every stage writes its outputs so that a crash never leaves a half-written
file behind: data goes to a temporary file in the same folder, then is renamed
over the target (rename is atomic on POSIX file systems). Readers ignore the temp files
(``.tmp-`` names).

A full disk (or a file-size limit or quota) while writing is a ``DiskFullError``
(a ``UserError``: one line naming the path and the cause), never a partial
file under the final name.

Fault injection (tests only): every place a stage commits a write calls
``write_point()``. With ``SAEMNESIA_TEST_KILL_AT_WRITE=N`` in the environment
the N-th call in a process SIGKILLs that process there (an atomic write: its
temp file written, not yet renamed), so a test can interrupt a stage at any
chosen write and check that the rerun reaches the uninterrupted result.
Without the variable ``write_point`` only counts.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import tempfile
import threading
from typing import Any

import numpy as np

from saemnesia_jax.runtime.errors import UserError

ENV_KILL_AT_WRITE = "SAEMNESIA_TEST_KILL_AT_WRITE"
_points = {"n": 0}
_points_lock = threading.Lock()
# Out of space, over the file-size limit (RLIMIT_FSIZE), over quota.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFullError(UserError):
  """A write failed for want of space; nothing was left under the final name."""


def write_point() -> int:
  """Counts a committed write (see the module docstring); the test hook may
  SIGKILL the process here. Returns the count so far in this process."""
  with _points_lock:
    _points["n"] += 1
    n = _points["n"]
  kill_at = os.environ.get(ENV_KILL_AT_WRITE, "")
  if kill_at and n == int(kill_at):
    os.kill(os.getpid(), signal.SIGKILL)
  return n


def write_points() -> int:
  """How many ``write_point`` calls this process made."""
  return _points["n"]


def disk_full(path: str, e: OSError) -> DiskFullError:
  """The one-line error of a write to ``path`` that ran out of space."""
  why = os.strerror(e.errno) if e.errno else str(e)
  return DiskFullError(f"cannot write {path}: {why} ({errno.errorcode.get(e.errno, e.errno)}): "
                       "free space (or raise the file-size limit / quota) and rerun")


def usual_mode(path: str) -> None:
  """mkstemp makes a file private (0600); give it what open() would (0666 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (temp file + fsync + rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = ""
  try:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    usual_mode(tmp)
    write_point()
    os.replace(tmp, path)
  except BaseException as e:
    if tmp and os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno in DISK_FULL:
      raise disk_full(path, e) from e
    raise


def _nearest_existing(path: str) -> str:
  p = os.path.abspath(path)
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  return p


def read_only(path: str) -> str:
  """'' if files can be made at ``path`` (the folder, or the nearest existing
  one above it, which the stage would create it in), else why not.

  Three tests, so that the answer holds as root too (``os.access`` ignores
  mode bits for root): the file system is mounted read-only (``statvfs``'s
  ``ST_RDONLY``); the folder has no write bit at all (``chmod a-w``: read-only
  on purpose, refused for root as well, who could write it anyway); it is not
  writable by this process's effective user (``os.access``).
  """
  p = _nearest_existing(path)
  if not os.path.isdir(p):
    return ""  # a file in the way: the stage's own checks name it
  if os.statvfs(p).f_flag & os.ST_RDONLY:
    return f"{p} is on a read-only file system"
  mode = os.stat(p).st_mode
  if not mode & 0o222:
    return f"{p} is read-only ({stat.filemode(mode)})"
  effective = os.access in os.supports_effective_ids
  if not os.access(p, os.W_OK | os.X_OK, effective_ids=effective):
    return f"{p} is not writable by this user ({stat.filemode(mode)})"
  return ""


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


def atomic_write_json(path: str, obj: Any, nonfinite_as_null: bool = False) -> None:
  """``obj`` as strict JSON (``dumps``), written atomically; ``nonfinite_as_null``
  for result tables whose NaN / inf mean "no value" (written as null)."""
  atomic_write_bytes(path, (dumps(obj, indent=2, where=path, nonfinite_as_null=nonfinite_as_null) + "\n").encode())


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
