"""Tests of saemnesia_jax/runtime/host_arrays.py: the array pool and gather_cast."""
import ml_dtypes
import numpy as np
import pytest

from saemnesia_jax.runtime import host_arrays


@pytest.mark.parametrize("piece_bytes", [512 << 10, 3 * 7 * 2])  # one piece; pieces of 3 rows and a rest
def test_gather_cast_is_exact_for_every_cast_the_reader_makes(monkeypatch, piece_bytes):
  monkeypatch.setattr(host_arrays, "_CAST_PIECE_BYTES", piece_bytes)
  rng = np.random.default_rng(0)
  x = rng.normal(0.0, 100.0, (50, 7)).astype(np.float32)
  x[3, 2], x[4, 0], x[5, 6] = np.nan, np.inf, -np.inf
  idx = rng.permutation(50)[:20]
  for store_dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
    src = x.astype(store_dtype)
    for out_dtype in (np.float32, store_dtype):
      out = np.empty((20, 7), out_dtype)
      host_arrays.gather_cast(src, idx, out)
      want = src[idx].astype(out_dtype)
      np.testing.assert_array_equal(out.view(f"u{out.itemsize}"), want.view(f"u{want.itemsize}"))


def test_pool_hands_out_only_unreferenced_arrays_within_its_budget():
  pool = host_arrays.Pool(max_bytes=3 * 800)
  a, b = np.zeros(100), np.ones(100)  # 800 bytes each
  view = b[10:20]
  pool.put(a)
  pool.put(b)
  del a, b
  got = pool.take(lambda x: x.shape == (100,))
  assert got is not None and got[0] == 0  # b is still seen through `view`
  assert pool.take(lambda x: x.shape == (100,)) is None
  del view
  assert pool.take(lambda x: x.shape == (100,))[0] == 1
  for k in range(5):
    pool.put(np.full(100, k))
  assert [int(x[0]) for x in pool._items] == [2, 3, 4]  # the oldest dropped


def test_pool_put_from_a_callback_inside_the_pool_does_not_deadlock():
  """A finalizer may call put while this thread holds the pool's lock (the
  garbage collector runs at any allocation): that put must return, and the
  array join the pool."""
  import threading
  pool = host_arrays.Pool(max_bytes=10 * 800)
  pool.put(np.zeros(100))
  late = np.full(100, 7.0)

  def fits(a):
    pool.put(late)  # as a finalizer would, with the lock held
    return False

  t = threading.Thread(target=pool.take, args=(fits,), daemon=True)
  t.start()
  t.join(timeout=10)
  assert not t.is_alive(), "put deadlocked inside take"
  del late
  got = pool.take(lambda x: x[0] == 7.0)
  assert got is not None and got[0] == 7.0


@pytest.mark.parametrize("dtype", [host_arrays.BF16, np.float16, np.float32])
def test_all_finite_finds_every_nan_and_inf(dtype):
  rng = np.random.default_rng(0)
  a = (rng.standard_normal((64, 9)) * 100).astype(dtype)
  big = float(ml_dtypes.finfo(dtype).max)
  a[0, :2] = [big, -big]  # the largest finite values: all exponent bits but one
  a[1, 0] = -0.0
  assert host_arrays.all_finite(a)
  for value in (np.nan, np.inf, -np.inf):
    b = a.copy()
    b[37, 5] = value
    assert not host_arrays.all_finite(b), (dtype, value)


@pytest.mark.parametrize("dtype", [host_arrays.BF16, np.float16])
def test_all_finite_agrees_with_isfinite_on_every_16_bit_pattern(dtype):
  bits = np.arange(1 << 16, dtype=np.uint16)
  values = bits.view(dtype)
  finite = np.isfinite(values.astype(np.float32))
  got = np.array([host_arrays.all_finite(values[i:i + 1]) for i in range(len(values))])
  np.testing.assert_array_equal(got, finite)  # every NaN payload and sign included
  assert host_arrays.all_finite(values[finite]) and not host_arrays.all_finite(values)


_RESIDENT = """
import os
import numpy as np
from saemnesia_jax.runtime import host_arrays
applied = host_arrays.keep_freed_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
a = np.ones(16 << 20, np.float32)  # a 64 MB block, touched and freed, as XLA:CPU's temporaries are each call
touched = rss()
del a
print(applied, touched - rss())
"""


@pytest.mark.parametrize("keep", ["1", "0"])
def test_keep_freed_memory_keeps_a_freed_block_for_reuse(keep):
  """With it, a freed 64 MB block stays resident (the next call reuses its pages
  instead of faulting fresh ones in); without it, glibc hands it back at once."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, **{host_arrays.ENV_KEEP_FREED: keep})
  out = subprocess.run([sys.executable, "-c", _RESIDENT], env=env, capture_output=True, text=True, check=True)
  applied, released_mb = out.stdout.split()
  assert applied == str(keep == "1")
  if keep == "1":
    assert int(released_mb) < 8, out.stdout
  else:
    assert int(released_mb) > 56, out.stdout
