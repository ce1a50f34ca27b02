"""Sampler speed: compile time apart from run time, images/s, and the run-time
ratio of capture-on, identity-edit and the latent clamp (a random SAE of
expansion 16, k 8, 3 latents clamped at every step) to plain sampling,
measured side by side in one run.

  python benchmarks/sampler.py                      # tiny SD-like + CanvasMini (if built)
  python benchmarks/sampler.py --models tiny --steps 20 --batch 4 --repeats 5

Each variant is compiled once (timed: ``lower`` + ``compile``), then the
variants are run in turn, ``--repeats`` rounds, so machine noise hits them
alike; the median run time per variant is reported, and ratios to plain.
Writes the figures as JSON too (``--json_out``, default
benchmarks/results/sampler.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from saemnesia_jax.diffusion import clamp
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax.sae import model as sae_lib
from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec


def identity_edit(p, x, step):
  del step
  return x * p["scale"]


def variants(pipe, steps: int, batch: int, block: str, k: int, expansion: int,
             n_clamped: int) -> dict[str, tuple[Sampler, object]]:
  spec = dict(num_steps=steps, batch_size=batch)
  plain = Sampler(pipe, SamplerSpec(**spec))
  d_in = plain.block_output_shape(block)[-1]
  # The latent clamp with a random SAE (speed does not depend on its values):
  # n_clamped latents edited at every step, threshold 0 (every firing token).
  sae_params = sae_lib.init_params(jax.random.PRNGKey(0), d_in, d_in * expansion)
  cs = clamp.empty_spec(steps, 32)
  cs = cs._replace(latents=np.arange(32, dtype=np.int32), active=np.arange(32)[None].repeat(steps, 0) < n_clamped,
                   multiplier=np.full_like(cs.multiplier, -10.0))
  out = {
      "plain": (plain, None),
      "capture": (Sampler(pipe, SamplerSpec(**spec, capture_block=block)), None),
      "identity_edit": (Sampler(pipe, SamplerSpec(**spec, edit_block=block), identity_edit),
                        {"scale": jnp.float32(1.0)}),
      "clamp": (Sampler(pipe, SamplerSpec(**spec, edit_block=block), clamp.make_edit_fn(k)), (sae_params, cs)),
  }
  return out


def bench_model(name: str, pipe, steps: int, batch: int, repeats: int, block: str, k: int = 8,
                expansion: int = 16, n_clamped: int = 3) -> dict:
  cond = pipe.tokenize(["A Disk image in Neon style."] * batch)
  uncond = pipe.tokenize([""] * batch)
  seeds = np.arange(batch, dtype=np.uint32)
  g = np.float32(7.5)
  res = {}
  runs = variants(pipe, steps, batch, block, k, expansion, n_clamped)
  for v, (sampler, ep) in runs.items():
    t = time.perf_counter()
    compiled = sampler.fn.lower(pipe.params, cond, uncond, seeds, g, ep).compile()
    res[v] = {"compile_s": time.perf_counter() - t, "runs": []}
    jax.block_until_ready(compiled(pipe.params, cond, uncond, seeds, g, ep))  # warm
    runs[v] = (compiled, ep)
  for _ in range(repeats):
    for v, (compiled, ep) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(compiled(pipe.params, cond, uncond, seeds, g, ep))
      res[v]["runs"].append(time.perf_counter() - t)
  base = statistics.median(res["plain"]["runs"])
  for v, r in res.items():
    r["run_s"] = statistics.median(r["runs"])
    r["images_per_s"] = batch / r["run_s"]
    r["ratio_to_plain"] = r["run_s"] / base
  return {"model": name, "steps": steps, "batch": batch, "block": block,
          "clamp": {"k": k, "expansion": expansion, "latents_clamped": n_clamped},
          "image_size": int(pipe.default_image_size), "variants": res}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="tiny,canvas_mini")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--block", default="up_blocks.1.attentions.1")
  ap.add_argument("--json_out", default=os.path.join(os.path.dirname(__file__), "results", "sampler.json"))
  args = ap.parse_args()
  results = {"devices": str(jax.devices()), "jax": jax.__version__, "models": []}
  for name in args.models.split(","):
    if name == "tiny":
      path = tiny_lib.write_tiny_pipeline(os.path.join(tempfile.mkdtemp(), "tiny"))
    elif name == "canvas_mini":
      from saemnesia_jax.canvas_mini import PIPELINE_DIR
      if not os.path.isdir(PIPELINE_DIR):
        print(f"skipping canvas_mini: {PIPELINE_DIR} not built")
        continue
      path = PIPELINE_DIR
    else:
      path = name
    pipe = models.load_pipeline(path)
    r = bench_model(name, pipe, args.steps, args.batch, args.repeats, args.block)
    results["models"].append(r)
    print(f"\n{name}: {r['image_size']}px, {args.steps} DDIM steps, CFG, batch {args.batch}, block {args.block}")
    print(f"  {'variant':15s} {'compile s':>10s} {'run s':>8s} {'images/s':>9s} {'x plain':>8s}")
    for v, x in r["variants"].items():
      print(f"  {v:15s} {x['compile_s']:10.2f} {x['run_s']:8.3f} {x['images_per_s']:9.2f} "
            f"{x['ratio_to_plain']:8.3f}")
  os.makedirs(os.path.dirname(args.json_out), exist_ok=True)
  with open(args.json_out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
  main()
