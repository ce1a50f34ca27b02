"""The accelerator parts of benchmarks/gpu_check.sh: the SAE train step at SD
shape (d_in 1280, 20,480 latents, k 32, BatchTopK, 4,096 tokens) in mixed
precision (float32 parameters, bfloat16 matmuls), float32 and bfloat16, and the sampler at batch 8 (16 UNet rows with CFG) at 512 px on
the random SD v1.5-architecture pipeline (benchmarks/sd_scale.py builds it),
printing tokens/s, images/s and MFU against the chip's bf16 matmul peak.

  python benchmarks/gpu_check.py [--toy] [--json_out FILE]

``--toy``: CanvasMini-size SAE and the tiny random pipeline at 32 px, to check
the script on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax.runtime import sizing
from saemnesia_jax.sae import model as sae_lib
from saemnesia_jax.sae import objectives


def _timed(fn, args, repeats):
  out = fn(*args)  # compile + first run
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def train_step(d_in: int, n_latents: int, k: int, batch: int, dtype, repeats: int, peak: float | None,
               matmul_dtype: str | None = None) -> dict:
  """The unsupervised step (loss, gradients, Adam, decoder renormalisation) with
  parameters in ``dtype`` and SaeConfig.matmul_dtype ``matmul_dtype``."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, d_in)), dtype)
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                  sae_lib.init_params(jax.random.PRNGKey(0), d_in, n_latents))
  tx = optax.adam(1e-4)
  cfg = sae_lib.SaeConfig(k=k, batch_topk=True, backward="auto", matmul_dtype=matmul_dtype)
  dead = jnp.zeros((n_latents,), bool)

  @jax.jit
  def step(params, opt_state, x):
    (loss, _), g = objectives.loss_and_grads(params, x, dead, cfg)
    upd, opt_state = tx.update(g, opt_state, params)
    return sae_lib.normalize_decoder(optax.apply_updates(params, upd)), opt_state, loss

  sec = _timed(step, (params, tx.init(params), x), repeats)
  # The FLOPs the formulation performs: the dense one the encoder's forward
  # and weight gradient (4dL) and the dense decoder (6dL); the sparse one
  # only the encoder's forward (2dL; the rest is O(k d) per token).
  backward = sae_lib.resolve_backward(cfg.backward)
  flops_per_token = (10 if backward == "dense" else 2) * d_in * n_latents
  tok_s = batch / sec
  return {"dtype": jnp.dtype(dtype).name, "matmul_dtype": matmul_dtype or jnp.dtype(dtype).name,
          "backward": backward, "tokens_per_s": tok_s, "step_s": sec,
          "mfu": None if peak is None else tok_s * flops_per_token / peak}


def sampler(pipe_dir: str, size: int, batch: int, steps: int, repeats: int, peak: float | None) -> dict:
  from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec, sample_prompts
  pipe = models.load_pipeline(pipe_dir, dtype="bfloat16")
  s = Sampler(pipe, SamplerSpec(num_steps=steps, height=size, width=size, batch_size=batch))
  prompts = ["A Dogs image in Van_Gogh style."] * batch
  run = lambda: sample_prompts(s, prompts, list(range(batch)), 9.0, progress=False)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    run()
  sec = (time.perf_counter() - t0) / repeats
  # UNet FLOPs per call (2 * batch rows with CFG), XLA's count.
  lat = size // pipe.vae_scale_factor
  x = jax.ShapeDtypeStruct((2 * batch, pipe.latent_channels, lat, lat), pipe.dtype)
  ctx = jax.ShapeDtypeStruct((2 * batch, pipe.max_length, pipe.text_encoder.config.hidden_size), pipe.dtype)
  f = jax.jit(lambda p, x, c: pipe.unet_apply(p, x, jnp.int32(10), c).sample)
  cost = f.lower(pipe.params, x, ctx).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  unet_flops = float(cost.get("flops", float("nan")))
  return {"images_per_s": batch / sec, "batch_s": sec, "first_batch_s_with_compile": first,
          "unet_tflops_per_call": unet_flops / 1e12,
          "mfu": None if peak is None else unet_flops * steps / sec / peak,
          "memory_efficient_attention": bool(pipe.unet.use_memory_efficient_attention)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--toy", action="store_true")
  ap.add_argument("--json_out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_check.json"))
  a = ap.parse_args()
  import sd_scale
  dev = jax.devices()[0]
  peak = sizing.peak_flops(dev.device_kind)
  print(f"device: {dev.device_kind} x {jax.device_count()}; bf16 matmul peak "
        f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)
  out = {"device": dev.device_kind, "peak_flops": peak, "train_step": [], "sampler": None}
  if a.toy:
    d_in, L, k, batch, reps = 64, 1024, 8, 512, 2
    pipe_dir = os.path.join(sd_scale.CACHE, "toy_pipeline")
    if not os.path.isdir(pipe_dir):
      tiny_lib.write_tiny_pipeline(pipe_dir)
    size, sbatch, steps, sreps = 32, 8, 2, 1
  else:
    d_in, L, k, batch, reps = 1280, 20480, 32, 4096, 20
    pipe_dir, size, sbatch, steps, sreps = sd_scale.build_pipeline(), 512, 8, 20, 2
  # Mixed precision (float32 parameters, bfloat16 matmuls: sae.matmul_dtype), float32, all bfloat16.
  for dtype, mm in ((jnp.float32, "bfloat16"), (jnp.float32, None), (jnp.bfloat16, None)):
    r = train_step(d_in, L, k, batch, dtype, reps, peak, mm)
    out["train_step"].append(r)
    print(f"SAE train step d_in {d_in} x {L}, batch {batch}, parameters {r['dtype']}, matmuls "
          f"{r['matmul_dtype']}, {r['backward']} backward: {r['tokens_per_s']:,.0f} tokens/s"
          + ("" if r["mfu"] is None else f", MFU {r['mfu']:.1%}"), flush=True)
  r = sampler(pipe_dir, size, sbatch, steps, sreps, peak)
  out["sampler"] = r
  print(f"sampler {size} px, batch {sbatch} (CFG: {2 * sbatch} UNet rows), {steps} steps, bf16: "
        f"{r['images_per_s']:.2f} images/s ({r['unet_tflops_per_call']:.2f} TFLOP per UNet call)"
        + ("" if r["mfu"] is None else f", MFU {r['mfu']:.1%}"), flush=True)
  os.makedirs(os.path.dirname(a.json_out), exist_ok=True)
  with open(a.json_out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {a.json_out}")


if __name__ == "__main__":
  main()
