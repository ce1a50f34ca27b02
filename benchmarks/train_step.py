"""SAE train-step throughput against the machine's practical peak, side by side.

  python benchmarks/train_step.py                       # SD and CanvasMini shapes
  python benchmarks/train_step.py --shapes canvas_mini --repeats 10
  python benchmarks/train_step.py --shapes sd --variants batchtopk_sparse --profile

For each shape (SD: d_in 1280, 20,480 latents, k 32; CanvasMini: d_in 64,
1,024 latents, k 8; batch 4,096 tokens), each variant (BatchTopK or per-token
TopK; ``*_sparse``: the sparse backward of ``sae_sparse``; ``*_dense``: the
dense reference, ``topk_gather`` with the gathered decoder) and each share of
dead latents (AuxK active when > 0), it times the trainer's jitted step (the
same computation as ``train.setup``'s step, on one device: loss, gradients,
Adam, decoder renormalisation, dead-latent counters) and, in the same run, a
plain dense matmul of the encoder's size (4,096 x d_in @ d_in x n_latents).
It prints tokens/s, FLOPs per token (by hand, and XLA's count, which adds up
every AuxK branch), the FLOP rate and its ratio to the matmul's, and the
ratio to the one-matmul bound: tokens/s x 2 d_in n_latents / the matmul's
rate (an SAE step needs one dense matmul per token, the encoder forward;
52 MFLOP at SD shape).  ``--profile`` times the sparse step's parts one by
one.  JSON goes to ``--json_out``.

Matmul FLOPs per token, by hand (d = d_in, L = latents): dense backward:
encoder forward + weight gradient 4dL; dense decoder forward + weight and
input gradients 6dL; gathered decoder 6kd instead.  Sparse backward: 2dL +
8kd.  AuxK is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from saemnesia_jax.sae import model as sae_lib

from saemnesia_jax.sae import objectives

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import loadavg  # noqa: E402

SHAPES = {"sd": dict(d_in=1280, n_latents=20480, k=32), "canvas_mini": dict(d_in=64, n_latents=1024, k=8)}
VARIANTS = {"batchtopk_sparse": dict(batch_topk=True, backward="sparse"),
            "topk_sparse": dict(batch_topk=False, backward="sparse"),
            "batchtopk_dense": dict(batch_topk=True, sparse_decode=False, backward="dense"),
            "topk_dense": dict(batch_topk=False, sparse_decode=False, backward="dense"),
            "topk_gather": dict(batch_topk=False, sparse_decode=True, backward="dense")}


def _time(fn, repeats):
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops")) if ca and ca.get("flops") else None
  except Exception:  # noqa: BLE001  (not every backend reports it)
    return None


def make_step(scfg: sae_lib.SaeConfig, tx):
  """What ``train.setup``'s unsupervised step does, on one device: (state, x) -> (state, loss)."""
  import optax

  def step(state, x):
    dead = sae_lib.dead_mask(state["dead"], scfg.dead_tokens_threshold)
    (loss, aux), g = objectives.loss_and_grads(state["params"], x, dead, scfg)
    u, o = tx.update(g, state["opt_state"], state["params"])
    p = sae_lib.normalize_decoder(optax.apply_updates(state["params"], u))
    return dict(params=p, opt_state=o, dead=sae_lib.update_dead_counter(state["dead"], aux["fired"], x.shape[0])), loss

  return step


def bench(shape: str, variant: str, batch: int, repeats: int, dead_fraction: float = 0.0) -> dict:
  s, v = SHAPES[shape], VARIANTS[variant]
  d, L, k = s["d_in"], s["n_latents"], s["k"]
  scfg = sae_lib.SaeConfig(k=k, **v)
  import optax
  tx = optax.chain(sae_lib.project_decoder_grads(), optax.clip_by_global_norm(1.0),
                   optax.adam(4e-4, eps=6.25e-10))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, d), np.float32))
  params = sae_lib.init_params(jax.random.PRNGKey(0), d, L, x[:256])
  # Dead latents (AuxK active): counters past the threshold for a random share.
  dead = np.zeros((L,), np.int32)
  dead[rng.permutation(L)[: int(round(dead_fraction * L))]] = scfg.dead_tokens_threshold + 1
  state = dict(params=params, opt_state=tx.init(params), dead=jnp.asarray(dead))

  step = make_step(scfg, tx)
  t = time.perf_counter()
  compiled = jax.jit(step).lower(state, x).compile()
  compile_s = time.perf_counter() - t
  # The dead counters are an input, not advanced between timed calls: every call sees the same dead set.
  step_s = _time(lambda: compiled(state, x)[1], repeats)
  w = params["W_enc"]
  mm = jax.jit(lambda a, b: a @ b).lower(x, w).compile()
  mm_s = _time(lambda: mm(x, w), repeats)
  sparse = sae_lib.resolve_backward(v["backward"]) == "sparse"
  if sparse:  # encoder forward; then O(k d) per token: decoder fwd/bwd (3kd), encoder weight grad (kd)
    by_hand = (2 * d * L + 8 * k * d) * batch
  else:
    by_hand = (4 * d * L + (6 * k * d if v.get("sparse_decode") else 6 * d * L)) * batch
  xla = _flops(compiled)
  mm_rate = 2 * batch * d * L / mm_s
  rate = by_hand / step_s
  bound_tokens_per_s = mm_rate / (2 * d * L)  # the one-matmul bound: the encoder forward alone
  return {"shape": shape, "variant": variant, "d_in": d, "n_latents": L, "k": k, "batch_tokens": batch,
          "dead_fraction": dead_fraction, "backward": sae_lib.resolve_backward(v["backward"]),
          "compile_s": compile_s, "step_s": step_s, "tokens_per_s": batch / step_s,
          "flops_per_token_by_hand": by_hand / batch, "flops_per_token_xla": None if xla is None else xla / batch,
          "achieved_gflops": rate / 1e9, "matmul_gflops": mm_rate / 1e9, "ratio_to_matmul": rate / mm_rate,
          "bound_tokens_per_s": bound_tokens_per_s, "ratio_to_bound": (batch / step_s) / bound_tokens_per_s,
          "loadavg": loadavg()}


def profile(shape: str, batch: int, repeats: int, dead_fraction: float, batch_topk: bool = True,
            matmul_dtype: str | None = None) -> list:
  """Where the sparse step's time goes: its parts timed one by one (jitted apart, so
  the sum is a little above the step's time: no fusion across the parts)."""
  import optax
  from saemnesia_jax.sae import sparse as sae_sparse
  s = SHAPES[shape]
  d, L, k = s["d_in"], s["n_latents"], s["k"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, d), np.float32))
  p = sae_lib.init_params(jax.random.PRNGKey(0), d, L, x[:256])
  dead = np.zeros((L,), bool)
  dead[rng.permutation(L)[: int(round(dead_fraction * L))]] = True
  dead = jnp.asarray(dead)
  z = sae_lib.encode_pre(p, x, matmul_dtype)
  vals, lat, tok = sae_sparse.select_pairs(z, k, batch_topk)
  x_hat = x * 0.5
  tx = optax.chain(sae_lib.project_decoder_grads(), optax.clip_by_global_norm(1.0), optax.adam(4e-4))
  opt = tx.init(p)

  def dec(p, vals, lat, tok, g):  # decoder forward + backward
    out, vjp = jax.vjp(lambda w, v: sae_sparse.decode_pairs(w, v, lat, tok, batch), p["W_dec"], vals)
    return out, vjp(g)

  def enc_bwd(p, x, vals, lat, tok):
    wt = p["W_enc"].T
    return jax.vjp(lambda a, b, c: sae_sparse.encoder_entries(a, b, c, x, vals, lat, tok), wt, p["b_enc"],
                   p["b_dec"])[1](vals)

  def auxk(p, x, x_hat, z, dead):
    return jax.grad(lambda p: sae_sparse.auxk_loss(p, x, x_hat, z, dead, matmul_dtype=matmul_dtype))(p)

  def opt_step(p, opt, g):
    u, o = tx.update(g, opt, p)
    return sae_lib.normalize_decoder(optax.apply_updates(p, u)), o

  parts = [("encoder matmul (x - b_dec) @ W_enc, ReLU", lambda p, x: sae_lib.encode_pre(p, x, matmul_dtype), (p, x)),
           ("TopK / BatchTopK selection", lambda z: sae_sparse.select_pairs(z, k, batch_topk), (z,)),
           ("decoder forward + backward (gathers, scatter-adds)", dec, (p, vals, lat, tok, x)),
           ("encoder sparse backward (scatter-add into W_enc^T)", enc_bwd, (p, x, vals, lat, tok)),
           ("optimizer: projection, clip, Adam, renorm", opt_step, (p, opt, p))]
  if dead_fraction > 0:  # with nothing dead the step's lax.cond (objectives.loss_and_grads) leaves AuxK out
    parts.insert(4, (f"AuxK forward + backward ({dead_fraction:.0%} dead)", auxk, (p, x, x_hat, z, dead)))
  rows = []
  for name, fn, args in parts:
    f = jax.jit(fn)
    rows.append({"part": name, "seconds": _time(lambda: f(*args), repeats), "loadavg": loadavg()})
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="canvas_mini,sd")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dead_fractions", default="0,0.25",
                  help="comma list: share of latents dead (AuxK active when > 0)")
  ap.add_argument("--profile", action="store_true",
                  help="also time the parts of the sparse BatchTopK step (at the last dead fraction)")
  ap.add_argument("--profile_matmul_dtypes", default="float32",
                  help="comma list: SaeConfig.matmul_dtype of each profile (float32 or bfloat16)")
  ap.add_argument("--malloc", choices=("keep", "glibc"), default="keep",
                  help="keep: freed memory stays with the process, as the trainer sets it on the CPU "
                       "(host_arrays.keep_freed_memory); glibc: the C library's defaults")
  ap.add_argument("--json_out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
  args = ap.parse_args()
  if args.malloc == "keep":
    from saemnesia_jax.runtime import host_arrays
    host_arrays.keep_freed_memory()
  rows = []
  print(f"devices: {jax.devices()}")
  print("bound: the one-matmul bound, matmul rate / (2 d_in n_latents) tokens/s (the encoder forward alone)")
  print(f"{'shape':12s} {'variant':16s} {'dead':>4s} {'compile s':>9s} {'step s':>8s} {'tokens/s':>9s} "
        f"{'MFLOP/tok':>9s} {'XLA':>9s} {'GFLOP/s':>8s} {'matmul':>7s} {'ratio':>5s} {'bound':>8s} "
        f"{'/bound':>6s}  load")
  for shape in args.shapes.split(","):
    for variant in args.variants.split(","):
      for dead in [float(f) for f in args.dead_fractions.split(",")]:
        r = bench(shape, variant, args.batch, args.repeats, dead)
        rows.append(r)
        xla = r["flops_per_token_xla"]
        print(f"{shape:12s} {variant:16s} {dead:4.2f} {r['compile_s']:9.1f} {r['step_s']:8.3f} "
              f"{r['tokens_per_s']:9.0f} {r['flops_per_token_by_hand'] / 1e6:9.2f} "
              f"{'' if xla is None else f'{xla / 1e6:9.2f}':>9s} {r['achieved_gflops']:8.1f} "
              f"{r['matmul_gflops']:7.1f} {r['ratio_to_matmul']:5.2f} {r['bound_tokens_per_s']:8.0f} "
              f"{r['ratio_to_bound']:6.2f}  {r['loadavg']}", flush=True)
  profiles = {}
  if args.profile:
    for shape in args.shapes.split(","):
      for dead in map(float, args.dead_fractions.split(",")):
        for dt in args.profile_matmul_dtypes.split(","):
          key = f"{shape} dead {dead:g}" + ("" if dt == "float32" else f" {dt} matmuls")
          prof = profiles[key] = profile(shape, args.batch, args.repeats, dead,
                                         matmul_dtype=None if dt == "float32" else dt)
          total = sum(r["seconds"] for r in prof)
          print(f"\nprofile of one sparse BatchTopK step, {shape}, {dead:.0%} dead, {dt} matmuls, parts jitted "
                f"apart (sum {total:.3f} s)")
          for r in prof:
            print(f"  {r['part']:52s} {r['seconds']:8.3f} s {r['seconds'] / total:6.1%}  load {r['loadavg']}")
  os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
  with open(args.json_out, "w") as f:
    json.dump({"devices": str(jax.devices()), "malloc": args.malloc, "rows": rows, "profiles": profiles}, f,
              indent=2)
  print(f"wrote {args.json_out}")


if __name__ == "__main__":
  sys.exit(main())
