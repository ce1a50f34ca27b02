"""AuxK's four matmul shapes at SD size, float32 against mixed precision (sae.matmul).

  python benchmarks/matmul_orientation.py

The mixed-precision step (``sae.matmul_dtype=bfloat16``) is only as fast as
XLA's bfloat16 dot in each orientation the step uses. This times the four
products of AuxK's block (4,096 tokens, d_in 1,280, 5,120 dead latents):
the forward ``codes @ W``, the column block ``xc @ W_t.T`` and the two
backward products ``g @ W.T`` and ``codes.T @ g``; rounds interleaved,
median of 5. Prints ms per product and writes JSON
(--json_out, default benchmarks/results/matmul_orientation.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from saemnesia_jax.sae import model as sae

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import loadavg  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--d_in", type=int, default=1280)
  ap.add_argument("--dead", type=int, default=5120)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--json_out", default=os.path.join(os.path.dirname(__file__), "results",
                                                     "matmul_orientation.json"))
  a = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  arr = lambda *shape: jax.numpy.asarray(rng.standard_normal(shape), np.float32)  # noqa: E731
  xc, w, codes, g = arr(a.tokens, a.d_in), arr(a.dead, a.d_in), arr(a.tokens, a.dead), arr(a.tokens, a.d_in)
  cases = {"codes @ W (forward)": (lambda p, q, dt: sae.matmul(p, q, dt), (codes, w)),
           "xc @ W_t.T (the block's columns)": (lambda p, q, dt: sae.matmul(p, q.T, dt), (xc, w)),
           "g @ W.T (backward)": (lambda p, q, dt: sae.matmul(p, q.T, dt), (g, w)),
           "codes.T @ g (backward)": (lambda p, q, dt: sae.matmul(p.T, q, dt), (codes, g))}
  fns = {(name, dt): (jax.jit(lambda p, q, f=f, dt=dt: f(p, q, dt)), args)
         for name, (f, args) in cases.items() for dt in (None, "bfloat16")}
  for f, args in fns.values():
    jax.block_until_ready(f(*args))
  times = {key: [] for key in fns}
  for _ in range(a.rounds):
    for key, (f, args) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[key].append(time.perf_counter() - t)
  rows = []
  print(f"{'product':34s} {'float32 ms':>10s} {'bf16 ms':>8s} {'speedup':>7s}   load {loadavg()}")
  for name in cases:
    f32, bf = (1e3 * statistics.median(times[(name, dt)]) for dt in (None, "bfloat16"))
    rows.append({"product": name, "float32_ms": f32, "bfloat16_ms": bf, "speedup": f32 / bf})
    print(f"{name:34s} {f32:10.0f} {bf:8.0f} {f32 / bf:7.2f}")
  os.makedirs(os.path.dirname(a.json_out), exist_ok=True)
  with open(a.json_out, "w") as fh:
    json.dump({"device": str(jax.devices()[0]), "shape": vars(a), "loadavg": loadavg(), "rows": rows}, fh, indent=1)
  print(f"wrote {a.json_out}")


if __name__ == "__main__":
  main()
