"""Host arrays for the store reader: a pool of reusable arrays, and a
GIL-free gather-and-cast of batch rows; and the process's malloc setting
for XLA:CPU (``keep_freed_memory``)."""
from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


class Pool:
  """Arrays to reuse, process-wide, at most ``max_bytes`` (oldest dropped).

  A fresh array of tens of MB costs the kernel a zero-fill per page on first
  touch, more than tensorstore spends decompressing into it (measured with
  perf); readers come and go (one per validation pass), so the pool outlives
  them. ``take`` hands out an array only if nothing but the pool refers to it.

  ``put`` runs from ``weakref.finalize`` callbacks, which the garbage
  collector may fire at any allocation, also inside this pool's own locked
  code: it only appends to a deque (atomic, no lock), and the arrays move
  into the pool under the lock when it is free. Arrays dropped over the
  budget are released after the lock, since freeing one can fire a callback.
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self._items: list[np.ndarray] = []
    self._returned: collections.deque[np.ndarray] = collections.deque()
    self._lock = threading.Lock()

  def _absorb(self) -> list[np.ndarray]:
    """Move returned arrays into the pool (lock held); the ones over budget."""
    while self._returned:
      self._items.append(self._returned.popleft())
    total, dropped = sum(x.nbytes for x in self._items), []
    while total > self.max_bytes:
      dropped.append(self._items.pop(0))
      total -= dropped[-1].nbytes
    return dropped

  def put(self, a: np.ndarray) -> None:
    self._returned.append(a)
    dropped = []
    if self._lock.acquire(blocking=False):  # held (maybe by this very thread): take() absorbs it later
      try:
        dropped = self._absorb()
      finally:
        self._lock.release()
    del dropped

  def take(self, fits) -> np.ndarray | None:
    dropped, found = [], None
    with self._lock:
      dropped = self._absorb()
      for k in range(len(self._items)):
        # References: the list and getrefcount's argument.
        if fits(self._items[k]) and sys.getrefcount(self._items[k]) == 2:
          found = self._items.pop(k)
          break
    del dropped
    return found


POOL = Pool(256 << 20)


_CAST_PIECE_BYTES = 512 << 10


def gather_cast(src: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
  """``out[:] = src[idx]`` cast to ``out.dtype``, with GIL-free numpy loops.

  bfloat16 -> float32 is exact as a 16-bit shift of the bits (ml_dtypes'
  cast is slower and holds the GIL).
  """
  bits = np.dtype(f"u{src.dtype.itemsize}")
  if out.dtype == src.dtype:
    np.take(src.view(bits), idx, axis=0, out=out.view(bits), mode="clip")
  elif src.dtype == BF16 and out.dtype == np.float32:
    # In pieces that stay in the core's cache: a whole-batch temporary costs a
    # fresh allocation (page faults) and a round trip through memory per batch.
    step = max(1, _CAST_PIECE_BYTES // src.strides[0])  # rows per piece
    scratch = np.empty((min(step, len(idx)), *src.shape[1:]), np.uint16)
    src16, out32 = src.view(np.uint16), out.view(np.uint32)
    for a in range(0, len(idx), step):
      piece = scratch[:min(step, len(idx) - a)]
      np.take(src16, idx[a:a + len(piece)], axis=0, out=piece, mode="clip")
      np.left_shift(piece, 16, out=out32[a:a + len(piece)], dtype=np.uint32)
  else:
    out[...] = np.take(src, idx, axis=0)


# Exponent bits: a float is NaN or Inf exactly when they are all set.
_EXPONENT = {BF16: 0x7F80, np.dtype(np.float16): 0x7C00, np.dtype(np.float32): 0x7F800000}


def all_finite(a: np.ndarray) -> bool:
  """``np.isfinite(a).all()`` for float arrays, as two max-reductions over the bits.

  A float is NaN/Inf when its bits without the sign are >= the exponent mask
  m: as signed integers the positive ones are >= m, as unsigned the negative
  ones are >= sign | m. Two read-only passes and no temporary: the mask-and-max
  it replaces (and ``np.isfinite``'s bool array) wrote a batch-sized array
  per call, about 7% of the reader's CPU time.
  """
  m = _EXPONENT.get(a.dtype)
  if m is None:
    return bool(np.isfinite(a).all())
  bits = 8 * a.dtype.itemsize
  u = a.reshape(-1).view(f"u{a.dtype.itemsize}")
  s = u.view(f"i{a.dtype.itemsize}")
  return not (int(s.max(initial=-(1 << (bits - 1)))) >= m or int(u.max(initial=0)) >= (1 << (bits - 1)) | m)


ENV_KEEP_FREED = "SAEMNESIA_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(environ=None) -> bool:
  """Has glibc keep freed memory for reuse instead of handing it back to the OS.

  XLA:CPU allocates every call's temporaries afresh. glibc serves large
  blocks (all over 32 MB) with new mmap pages and unmaps them on free, so
  each train step zero-fills its whole working set again, one page fault at
  a time (the SAE step at CanvasMini's shape: 17.5 ms with the faults, 9.4
  without).
  With no mmap'd blocks and a 2 GB trim threshold the pages stay with the
  process, at the cost of its resident memory staying at its peak.
  ``SAEMNESIA_KEEP_FREED_MEMORY=0`` turns it off; a no-op without glibc.
  Returns whether it was applied.
  """
  environ = os.environ if environ is None else environ
  if environ.get(ENV_KEEP_FREED, "1").strip() in ("0", "false", "no"):
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differ or do nothing
  except (OSError, AttributeError):
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
