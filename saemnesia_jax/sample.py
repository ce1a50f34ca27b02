"""Stage `sample`: text-to-image sampling with the jitted DDIM + CFG sampler.

  python -m saemnesia_jax.sample --config configs/tiny.py \
      --config.prompts="('A cat image in neon style.',)" --config.seeds="(1, 2)"

Writes ``{workdir}/samples/``: one PNG per (prompt, seed), ``grid.png`` (rows:
prompts, columns: seeds) and ``manifest.json`` (config, model, timings).
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("sample")

import os
import time

import jax
import ml_collections
from absl import logging

from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.diffusion.sampler import sample_prompts
from saemnesia_jax.evaluation import images
from saemnesia_jax.runtime import layout, sizing
from saemnesia_jax.runtime.io_utils import atomic_write_json


def run(config: ml_collections.ConfigDict) -> dict:
  if config.get("dry_run"):  # compile only: per-device memory and images/s (runtime/sizing.py)
    pipe = common.load_model(config, abstract=True)
    return sizing.sampler_dry_run(config, "sample", pipe, common.make_sampler(config, pipe))
  if not config.prompts:
    raise ValueError("config.prompts is empty: give at least one prompt, e.g. "
                     "--config.prompts=\"('A cat image in neon style.',)\"")
  if not config.seeds:
    raise ValueError("config.seeds is empty: give at least one seed, e.g. --config.seeds=\"(188,)\"")
  out_dir = layout.samples_dir(config.workdir)
  pipe = common.load_model(config)
  sampler = common.make_sampler(config, pipe)
  prompts = [p for p in config.prompts for _ in config.seeds]
  seeds = [s for _ in config.prompts for s in config.seeds]
  t0 = time.perf_counter()
  imgs = sample_prompts(sampler, prompts, seeds, config.sampler.guidance_scale)
  wall = time.perf_counter() - t0
  scale = max(1, 128 // sampler.width)
  for i, (img, seed) in enumerate(zip(imgs, seeds)):
    images.save_png(os.path.join(out_dir, f"{i // len(config.seeds):04d}_seed{seed}.png"), img, scale)
  g = images.grid(imgs, len(config.prompts), len(config.seeds), scale=scale,
                  col_labels=[f"seed {s}" for s in config.seeds])
  images.save_image(os.path.join(out_dir, "grid.png"), g)
  manifest = {"stage": "sample", "config": common.config_json(config), "model": pipe.path,
              "n_images": len(imgs), "wall_s": wall, "images_per_s": len(imgs) / wall,
              "image_size": [sampler.height, sampler.width], "devices": str(jax.devices())}
  atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
  logging.info("wrote %d images to %s (%.1f s, %.2f images/s incl. compile)",
               len(imgs), out_dir, wall, len(imgs) / wall)
  print(f"wrote {len(imgs)} images and grid.png to {out_dir} in {wall:.1f} s")
  return manifest

