"""SAE train-step throughput against the machine's practical peak, side by side.

  python benchmarks/train_step.py                       # SD and CanvasMini shapes
  python benchmarks/train_step.py --shapes canvas_mini --repeats 10

For each shape (SD: d_in 1280, 20,480 latents, k 32; CanvasMini: d_in 64,
1,024 latents, k 8; batch 4,096 tokens) and each decoder variant (BatchTopK
with a dense decoder, as SAeUron trains; per-token TopK dense; per-token TopK
gathering the k active decoder rows), it times the trainer's jitted step
(the same computation as ``train.setup``'s step, on one device: loss,
gradients, Adam, decoder renormalisation, dead-latent counters) and, in the same run, a plain
dense matmul of the encoder's size (4,096 x d_in @ d_in x n_latents): the
practical peak. It prints tokens/s, FLOPs per token (the matmuls counted by
hand, and XLA's own count), the achieved FLOP rate and its ratio to the
matmul's, and writes JSON (``--json_out``).

Matmul FLOPs per token, by hand (d = d_in, L = latents): encoder forward +
weight gradient 4dL; dense decoder forward + weight and input gradients 6dL;
gathered decoder 6kd instead. AuxK, active only while latents are dead, is
not counted (nothing is dead in a fresh SAE).
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

from saemnesia_jax import sae as sae_lib

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
    (loss, aux), g = jax.value_and_grad(sae_lib.unsupervised_loss, has_aux=True)(state["params"], x, dead, scfg)
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
          "loadavg": _loadavg()}


def _loadavg() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="canvas_mini,sd")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dead_fractions", default="0,0.25",
                  help="comma list: share of latents dead (AuxK active when > 0)")
  ap.add_argument("--json_out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
  args = ap.parse_args()
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
  os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
  with open(args.json_out, "w") as f:
    json.dump({"devices": str(jax.devices()), "rows": rows}, f, indent=2)
  print(f"wrote {args.json_out}")


if __name__ == "__main__":
  sys.exit(main())
