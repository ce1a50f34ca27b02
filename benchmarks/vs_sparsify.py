"""The project's SAE train step against EleutherAI sparsify's, side by side.

  python benchmarks/vs_sparsify.py                                  # SD and CanvasMini shapes
  python benchmarks/vs_sparsify.py --shapes canvas_mini --rounds 3 --steps-per-round 5

The peer is ``sparsify.SparseCoder`` (alias ``Sae``; PyPI ``eai-sparsify``,
the code SAeUron's SAE is built on) with SAeUron's trainer behaviour around
it: FVU + AuxK / 32, Adam (lr 4e-4, eps 6.25e-10), gradient clipping 1.0,
the decoder gradient's parallel component removed
(``remove_gradient_parallel_to_decoder_directions``), unit-norm decoder
rows after each step, dead-latent counters.  Variants:

  batchtopk  SAeUron's training mode: the k*N largest pre-activations of the
             batch (``torch.topk`` over the flattened batch) on sparsify's
             parameters; decoded, as sparsify decodes, by ``embedding_bag``
             over the selected (token, latent) pairs; sparsify's AuxK.
  topk       sparsify's own ``SparseCoder.forward`` unchanged (fused encoder
             with its index_add backward, embedding_bag decoder, AuxK).

The project's side is the trainer's step (``benchmarks/train_step.make_step``:
loss, gradients, Adam, decoder renormalisation, dead counters) with
``--backward`` (default: the platform's auto choice) and, one process per
entry of ``--matmul-dtypes``, the SaeConfig.matmul_dtype (float32, the
peer's precision; bfloat16: mixed precision, its bound timed in bfloat16
too).  Both sides see the
same batch every step and the same dead set (the counters are reset to the
chosen pattern before each step: a fresh SAE would otherwise revive every
dead latent in one step).

Each side runs in its own long-lived process (driven over pipes, JSON
lines); rounds are interleaved (project, peer 2 threads, peer 1 thread, ...),
and the machine's load average is recorded beside every figure.  Both
sides run with the same glibc malloc setting (``--malloc``; default keep, the
trainer's setting on the CPU).  The
project's process also times a dense matmul of the encoder's size in each
round: the one-matmul bound is that rate / (2 d_in n_latents) tokens/s.

The peer is installed outside the project's environment, so its
dependencies (a CUDA torch, transformers 5) never move the project's pins:
on first use this script runs ``pip install --no-deps --target
benchmarks/.peer_site eai-sparsify==1.3.3`` plus the few light modules the
SparseCoder imports (einops, natsort, simple-parsing, docstring-parser,
accelerate); it then imports ``sparsify.sparse_coder`` without the package's
``__init__`` (which pulls in the trainer and ``datasets``).  The installed
torch (CPU) is used.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import THREADS_NOTE, Worker, become_worker, loadavg, serve, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
PEER_SITE = os.path.join(HERE, ".peer_site")
PEER_PACKAGES = ["eai-sparsify==1.3.3", "einops", "natsort", "simple-parsing", "docstring-parser", "accelerate"]
SHAPES = {"sd": dict(d_in=1280, n_latents=20480, k=32), "canvas_mini": dict(d_in=64, n_latents=1024, k=8)}
LR, ADAM_EPS, CLIP, AUXK_ALPHA = 4e-4, 6.25e-10, 1.0, 1 / 32



# ---------------------------------------------------------------- workers



def _data(d_in, n_latents, batch, dead_fraction, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, d_in)).astype(np.float32)
  dead = np.zeros((n_latents,), bool)
  dead[rng.permutation(n_latents)[: int(round(dead_fraction * n_latents))]] = True
  return x, dead


def jax_worker(backward: str, matmul_dtype: str | None = None) -> None:
  sys.path.insert(0, HERE)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from saemnesia_jax.sae import model as sae_lib
  from train_step import make_step  # the trainer's step on one device
  st = {}

  def handle(cmd):
    if cmd["cmd"] == "setup":
      s = SHAPES[cmd["shape"]]
      d, L, k = s["d_in"], s["n_latents"], s["k"]
      scfg = sae_lib.SaeConfig(k=k, batch_topk=cmd["variant"] == "batchtopk", backward=backward,
                               matmul_dtype=matmul_dtype)
      tx = optax.chain(sae_lib.project_decoder_grads(), optax.clip_by_global_norm(CLIP),
                       optax.adam(LR, eps=ADAM_EPS))
      x, dead = _data(d, L, cmd["batch"], cmd["dead_fraction"])
      x = jnp.asarray(x)
      counters = jnp.asarray(np.where(dead, scfg.dead_tokens_threshold + 1, 0).astype(np.int32))
      params = sae_lib.init_params(jax.random.PRNGKey(0), d, L)
      w = jnp.array(params["W_enc"], copy=True)  # the step donates (deletes) the parameters
      inner = make_step(scfg, tx)
      # The counters reset to the chosen dead set before every step (an argument, not donated).
      step = jax.jit(lambda state, x, counters: inner({**state, "dead": counters}, x), donate_argnums=0)
      state = dict(params=params, opt_state=tx.init(params), dead=counters)
      t = time.perf_counter()
      state, loss = step(state, x, counters)
      jax.block_until_ready(loss)
      mm = jax.jit(lambda a, b: sae_lib.matmul(a, b, matmul_dtype))  # the bound in the step's precision
      jax.block_until_ready(mm(x, w))
      st.update(step=step, state=state, x=x, counters=counters, mm=mm, w=w, flop=2 * d * L)
      return {"compile_s": time.perf_counter() - t, "backward": sae_lib.resolve_backward(backward),
              "device": str(jax.devices()[0])}
    if cmd["cmd"] == "run":
      x, n = st["x"], cmd["steps"]
      t = time.perf_counter()
      for _ in range(n):
        st["state"], loss = st["step"](st["state"], x, st["counters"])
      jax.block_until_ready(loss)
      step_s = (time.perf_counter() - t) / n
      reps = cmd.get("matmul_reps", 2)
      t = time.perf_counter()
      for _ in range(reps):
        r = st["mm"](x, st["w"])
      jax.block_until_ready(r)
      mm_s = (time.perf_counter() - t) / reps
      return {"tokens_per_s": x.shape[0] / step_s, "loss": float(loss),
              "matmul_gflops": st["flop"] * x.shape[0] / mm_s / 1e9}
    raise ValueError(f"unknown command {cmd['cmd']!r}")

  serve(handle)


def _import_sparsify():
  """``sparsify.sparse_coder`` from the peer site, skipping the package's __init__."""
  import importlib.util
  import types
  sys.path.insert(0, PEER_SITE)
  spec = importlib.util.find_spec("sparsify")
  if spec is None:
    raise ImportError(f"sparsify is not installed in {PEER_SITE}")
  pkg = types.ModuleType("sparsify")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["sparsify"] = pkg
  from sparsify.config import SparseCoderConfig
  from sparsify.sparse_coder import SparseCoder
  return SparseCoder, SparseCoderConfig


def torch_worker() -> None:
  import torch
  import torch.nn.functional as F
  SparseCoder, SparseCoderConfig = _import_sparsify()
  st = {}

  def batchtopk_forward(sae, x, dead_mask, k):
    """SAeUron's BatchTopK on sparsify's SparseCoder: FVU and AuxK as sparsify's forward."""
    pre = F.relu(sae.encoder(x - sae.b_dec))
    N, L = pre.shape
    vals, flat = pre.flatten().topk(k * N, sorted=False)
    tok, lat = flat // L, flat % L
    order = torch.argsort(tok)  # embedding_bag wants each token's latents contiguous
    counts = torch.bincount(tok, minlength=N)
    offsets = torch.cumsum(counts, 0) - counts
    x_hat = F.embedding_bag(lat[order], sae.W_dec, offsets, mode="sum",
                            per_sample_weights=vals[order]) + sae.b_dec
    e = x - x_hat
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = e.pow(2).sum() / total_variance
    num_dead = int(dead_mask.sum())
    if num_dead > 0:  # sparsify's AuxK, as in SparseCoder.forward
      k_aux = x.shape[-1] // 2
      scale = min(num_dead / k_aux, 1.0)
      k_aux = min(k_aux, num_dead)
      auxk_acts, auxk_idx = torch.where(dead_mask[None], pre, -torch.inf).topk(k_aux, sorted=False)
      e_hat = F.embedding_bag(auxk_idx, sae.W_dec, mode="sum", per_sample_weights=auxk_acts)
      auxk = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
    else:
      auxk = fvu.new_tensor(0.0)
    return fvu, auxk, lat

  def handle(cmd):
    if cmd["cmd"] == "setup":
      s = SHAPES[cmd["shape"]]
      d, L, k = s["d_in"], s["n_latents"], s["k"]
      torch.manual_seed(0)
      sae = SparseCoder(d, SparseCoderConfig(num_latents=L, k=k))
      x, dead = _data(d, L, cmd["batch"], cmd["dead_fraction"])
      opt = torch.optim.Adam(sae.parameters(), lr=LR, eps=ADAM_EPS)
      st.update(sae=sae, x=torch.from_numpy(x), dead=torch.from_numpy(dead), opt=opt, k=k,
                variant=cmd["variant"], since_fired=torch.zeros(L, dtype=torch.long))
      t = time.perf_counter()
      one_step()
      return {"compile_s": time.perf_counter() - t, "torch": torch.__version__}
    if cmd["cmd"] == "run":
      torch.set_num_threads(cmd["threads"])
      n = cmd["steps"]
      t = time.perf_counter()
      for _ in range(n):
        loss = one_step()
      step_s = (time.perf_counter() - t) / n
      return {"tokens_per_s": st["x"].shape[0] / step_s, "loss": loss, "threads": torch.get_num_threads()}
    raise ValueError(f"unknown command {cmd['cmd']!r}")

  def one_step():
    sae, x, dead, opt = st["sae"], st["x"], st["dead"], st["opt"]
    if st["variant"] == "batchtopk":
      fvu, auxk, lat = batchtopk_forward(sae, x, dead, st["k"])
    else:
      out = sae(x, dead_mask=dead)
      fvu, auxk, lat = out.fvu, out.auxk_loss, out.latent_indices.flatten()
    loss = fvu + AUXK_ALPHA * auxk
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=False)
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():  # SAeUron's dead counters
      st["since_fired"] += x.shape[0]
      st["since_fired"][lat] = 0
    return float(loss.detach())

  serve(handle)


# ---------------------------------------------------------------- driver



def ensure_peer() -> None:
  if os.path.isdir(os.path.join(PEER_SITE, "sparsify")):
    return
  print(f"installing the peer into {PEER_SITE} (pip --no-deps: the project's pins do not move)", flush=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", PEER_SITE,
                  *PEER_PACKAGES], check=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="sd,canvas_mini")
  ap.add_argument("--variants", default="batchtopk", help="comma list: batchtopk, topk")
  ap.add_argument("--dead-fractions", default="0.25,0",
                  help="comma list: share of latents dead (AuxK active when > 0)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps-per-round", type=int, default=3)
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--peer-threads", default="2,1", help="comma list: torch thread counts of the peer")
  ap.add_argument("--backward", default="auto", help="the project's SaeConfig.backward")
  ap.add_argument("--matmul-dtypes", default="float32",
                  help="comma list: the project's SaeConfig.matmul_dtype per project process "
                       "(float32 = the parameters' dtype; bfloat16 = mixed precision)")
  ap.add_argument("--malloc", choices=("keep", "glibc"), default="keep",
                  help="both sides' glibc malloc: keep (freed memory stays with the process, as the trainer "
                       "sets it on the CPU) or glibc (the defaults)")
  ap.add_argument("--json_out", default=os.path.join(HERE, "results", "vs_sparsify.json"))
  args = ap.parse_args()
  ensure_peer()
  threads = [int(t) for t in args.peer_threads.split(",")]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  # The same setting on both sides, through glibc's own variables: what the trainer's
  # host_arrays.keep_freed_memory() sets with mallopt (no mmap'd blocks, 2 GB trim threshold).
  for var in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
    env.pop(var, None)
  if args.malloc == "keep":
    env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2 ** 31 - 1))
  env.setdefault("SPARSIFY_DISABLE_TRITON", "1")
  env.pop("XLA_FLAGS", None)  # one CPU device, all cores
  dtypes = args.matmul_dtypes.split(",")
  # One process per precision; "project" is float32 (the same precision as the peer).
  labels = {dt: "project" if dt == "float32" else f"project_{dt}" for dt in dtypes}
  projects = {labels[dt]: Worker(f"project (JAX, {dt})", SCRIPT,
                                 ["--worker", "jax", "--backward", args.backward, "--matmul-dtype", dt], env)
              for dt in dtypes}
  peer = Worker("peer (sparsify)", SCRIPT, ["--worker", "torch"], env)
  cpus = os.cpu_count()
  print(f"machine: {cpus} CPUs; the project's XLA uses them all; the peer runs with {threads} torch threads; "
        f"malloc on both sides: {args.malloc}")
  print(f"note: {THREADS_NOTE}")
  results = []
  try:
    for shape in args.shapes.split(","):
      for variant in args.variants.split(","):
        for dead in [float(f) for f in args.dead_fractions.split(",")]:
          setup = dict(cmd="setup", shape=shape, variant=variant, batch=args.batch, dead_fraction=dead)
          a = {lab: w.ask(**setup) for lab, w in projects.items()}
          b = peer.ask(**setup)
          rounds = []
          for r in range(args.rounds):
            row = {"round": r}
            order = [(lab, None) for lab in projects] + [("peer", t) for t in threads]
            if r % 2:
              order = order[::-1]  # A B C, C B A, ...: neither side always follows the other
            for side, t in order:
              before = loadavg()
              if side in projects:
                res = projects[side].ask(cmd="run", steps=args.steps_per_round)
                row.update({side: res["tokens_per_s"], f"matmul_gflops_{side}": res["matmul_gflops"],
                            f"load_{side}": [before, loadavg()]})
              else:
                res = peer.ask(cmd="run", steps=args.steps_per_round, threads=t)
                row[f"peer_{t}t"] = res["tokens_per_s"]
                row[f"load_peer_{t}t"] = [before, loadavg()]
            rounds.append(row)
            print(f"  {shape} {variant} dead {dead:.2f} round {r}: "
                  + ", ".join(f"{lab} {row[lab]:.0f} tok/s (load {row[f'load_{lab}'][0]})" for lab in projects)
                  + ", " + ", ".join(f"peer {t}t {row[f'peer_{t}t']:.0f} (load {row[f'load_peer_{t}t'][0]})"
                              for t in threads), flush=True)
          med = {key: statistics.median(rw[key] for rw in rounds)
                 for key in [*projects, *(f"matmul_gflops_{lab}" for lab in projects),
                             *(f"peer_{t}t" for t in threads)]}
          s = SHAPES[shape]
          summary = {"shape": shape, "variant": variant, "dead_fraction": dead, **s, "batch": args.batch,
                     "backward": next(iter(a.values()))["backward"], "matmul_dtypes": dtypes,
                     **{f"peer_{t}t_tokens_per_s": med[f"peer_{t}t"] for t in threads},
                     "torch": b["torch"], "rounds": rounds}
          for lab in projects:  # keys of "project" (float32) keep their old names
            bound = med[f"matmul_gflops_{lab}"] * 1e9 / (2 * s["d_in"] * s["n_latents"])
            pre = "" if lab == "project" else lab[len("project"):]
            summary.update({f"project{pre}_compile_s": a[lab]["compile_s"],
                            f"project{pre}_tokens_per_s": med[lab],
                            f"matmul_gflops{pre}": med[f"matmul_gflops_{lab}"],
                            f"bound{pre}_tokens_per_s": bound, f"ratio{pre}_to_bound": med[lab] / bound,
                            **{f"ratio{pre}_vs_peer_{t}t": med[lab] / med[f"peer_{t}t"] for t in threads}})
          results.append(summary)
  finally:
    for w in projects.values():
      w.close()
    peer.close()
  print(f"\nmedians over {args.rounds} rounds x {args.steps_per_round} steps, batch {args.batch} tokens "
        f"(load average per round in the JSON)")
  head = f"{'shape':12s} {'variant':10s} {'dead':>5s} {'project':>17s} " + " ".join(
      f"{f'peer {t}t':>9s} {f'x{t}t':>6s}" for t in threads) + f" {'bound':>7s} {'/bound':>6s}"
  print(head)
  for s in results:
    for dt, lab in labels.items():
      pre = "" if lab == "project" else lab[len("project"):]
      print(f"{s['shape']:12s} {s['variant']:10s} {s['dead_fraction']:5.2f} "
            f"{s[f'project{pre}_tokens_per_s']:8.0f} {dt:>8s} "
            + " ".join(f"{s[f'peer_{t}t_tokens_per_s']:9.0f} {s[f'ratio{pre}_vs_peer_{t}t']:6.2f}" for t in threads)
            + f" {s[f'bound{pre}_tokens_per_s']:7.0f} {s[f'ratio{pre}_to_bound']:6.2f}")
  print("tokens/s; xNt: project / peer with N torch threads; bound: dense-matmul rate / (2 d_in n_latents), "
        "the one-matmul bound, measured in the project's process each round")
  write_results(args.json_out, cpus, results)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    become_worker()
    backward = sys.argv[sys.argv.index("--backward") + 1] if "--backward" in sys.argv else "auto"
    dtype = sys.argv[sys.argv.index("--matmul-dtype") + 1] if "--matmul-dtype" in sys.argv else "float32"
    jax_worker(backward, None if dtype == "float32" else dtype) if sys.argv[2] == "jax" else torch_worker()
  else:
    main()
