"""Stage `collect`: capture one block's activations into a tensorstore store.

  python -m saemnesia_jax.collect --config configs/canvas_mini.py

Runs the jitted sampler over the prompt grid (every object x style prompt and
the anchor prompts, ``collect.seeds`` each; or, with
``collect.anchor_prompts_dir``, SAeUron's anchor prompts in every style: see
``plan``) and stores, for the conditional
half of CFG at every step, the hooked block's output: one *map* of
(H*W tokens, d_in) per (prompt, seed, step), with labels (object, style,
timestep, step, prompt id, seed). See ``store/__init__.py`` for the layout.

Work is cut into units of one sampler batch (``sampler.batch_size``
trajectories x ``num_steps`` maps); row = trajectory * num_steps + step, so a
rerun rewrites the same rows. A unit is done once its marker is written: a
crash loses at most the units in flight, and a rerun does only what is
missing. With several processes (``jax.distributed``, or
``--config.collect.process_count``), process p takes units u with
u % count == p, all writing one store.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("collect")

import hashlib
import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from saemnesia_jax import store
from saemnesia_jax.diffusion import blocks
from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.evaluation import concepts, protocol
from saemnesia_jax.runtime import layout, runs, sizing
from saemnesia_jax.runtime.config_docs import flat_fields
from saemnesia_jax.runtime.errors import RunMismatchError
from saemnesia_jax.runtime.io_utils import read_json
from saemnesia_jax.runtime.units import initialize_distributed

store_path = layout.store_path


def _maps_per_chunk(num_steps: int, map_bytes: int, target: int = 4 << 20) -> int:
  """The largest divisor of num_steps whose chunk stays under ``target`` bytes.

  Chunks then never straddle a trajectory, so the reader's train/validation
  split (by trajectory) never reads data it throws away.
  """
  best = 1
  for d in range(1, num_steps + 1):
    if num_steps % d == 0 and d * map_bytes <= target:
      best = d
  return best


def plan(config: ml_collections.ConfigDict):
  """(prompt grid, trajectories [(prompt index, seed)]) of a collection.

  The prompts: the concept grid, or with ``collect.anchor_prompts_dir`` the
  anchor prompt files (``concepts.anchor_file_grid``). Prompt i's trajectory
  for seed s uses seed ``s + i * collect.seed_stride`` (a distinct starting
  noise per prompt with a stride > 0).
  """
  c = config.collect
  if c.anchor_prompts_dir:
    grid = concepts.anchor_file_grid(config.concepts, c.anchor_prompts_dir, c.prompts_per_object)
  else:
    grid = concepts.prompt_grid(config.concepts)
  seeds = list(c.seeds)
  if not seeds:
    raise ValueError("config.collect.seeds is empty: give at least one seed")
  stride = int(c.seed_stride)
  return grid, [(i, s + i * stride) for i in range(len(grid)) for s in seeds]


def evaluation_overlap(config: ml_collections.ConfigDict, grid=None, trajs=None) -> list[tuple[str, int]]:
  """(prompt, seed) pairs that the collection and the evaluation (sweep, rule
  or final seeds) both sample: images the SAE, its scores and its supervision
  would see before they are judged."""
  if grid is None:
    grid, trajs = plan(config)
  ev = config.evaluate
  judged = {(p.prompt, int(s)) for p in protocol.evaluation_grid(config)
            for s in tuple(ev.sweep_seeds) + tuple(ev.get("rule_seeds", ())) + tuple(ev.eval_seeds)}
  return sorted({(grid[i].prompt, int(s)) for i, s in trajs} & judged)


def check_disjoint(config: ml_collections.ConfigDict, grid, trajs) -> None:
  overlap = evaluation_overlap(config, grid, trajs)
  if overlap and not config.collect.allow_eval_overlap:
    raise ValueError(
        f"the collection samples {len(overlap)} (prompt, seed) pairs that the evaluation judges, e.g. "
        f"{overlap[0]}: use other collect.seeds (or collect.anchor_prompts_dir), or set "
        "collect.allow_eval_overlap=True to accept it")


def _source(c: ml_collections.ConfigDict, grid) -> dict:
  """What the manifest records of the prompts beyond the concept grid (nothing
  for the grid itself, so that stores collected before these fields keep their identity)."""
  out = {}
  if c.anchor_prompts_dir:
    digest = hashlib.sha256("\n".join(p.prompt for p in grid).encode()).hexdigest()
    out.update(anchor_prompts_dir=os.path.abspath(c.anchor_prompts_dir), prompts_per_object=int(c.prompts_per_object),
               prompts_sha256=digest)
  if c.seed_stride:
    out["seed_stride"] = int(c.seed_stride)
  return out


class Collection(NamedTuple):
  """Everything a collection run needs, built once (model, sampler, store, plan)."""
  config: ml_collections.ConfigDict
  pipe: Any
  sampler: Any
  store: store.Store
  grid: list
  trajs: list
  cond_ids: np.ndarray
  uncond_ids: np.ndarray


def prepare(config: ml_collections.ConfigDict) -> Collection:
  """Loads the model, builds the capturing sampler, creates or opens the store."""
  c = config.collect
  pipe = common.load_model(config)
  sampler = common.make_sampler(config, pipe, capture=True)
  grid, trajs = plan(config)
  check_disjoint(config, grid, trajs)
  steps, bs = config.sampler.num_steps, config.sampler.batch_size
  h, w, d_in = sampler.block_output_shape()
  manifest = store.make_manifest(
      model_dir=pipe.path, weights_sha256=pipe.weights_hash(), block=config.block,
      scheduler={**{k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
                 "class": "FlaxDDIMScheduler", "eta": 0.0},
      num_steps=steps, guidance_scale=float(config.sampler.guidance_scale),
      prompt_grid={**concepts.as_dict(config.concepts), "seeds": list(c.seeds),
                   "n_prompts": len(grid), "image_size": [sampler.height, sampler.width],
                   **_source(c, grid)},
      n_maps=len(trajs) * steps, tokens_per_map=h * w, d_in=d_in, maps_per_unit=bs * steps,
      maps_per_chunk=_maps_per_chunk(steps, h * w * d_in * store.DTYPES[c.dtype].itemsize),
      dtype=c.dtype, compression=c.compression,
      info={"model_dir": pipe.path, "model_dtype": config.model.dtype,
            "timesteps": sampler.timesteps.tolist(), "block_shape": [h, w, d_in]})
  _check_existing(store_path(config), manifest, runs.overwrite(config))
  st = store.open_store(store_path(config), manifest, create=True)
  return Collection(config, pipe, sampler, st, grid, trajs,
                    pipe.tokenize([p.prompt for p in grid]), pipe.tokenize([""] * bs))


def _check_existing(path: str, manifest: dict, overwrite: bool) -> None:
  """An existing store must be this collection's (its manifest is the
  fingerprint): else refuse, naming each difference, or with ``overwrite``
  delete it."""
  mpath = os.path.join(path, "manifest.json")
  if not os.path.isfile(mpath):
    return
  found = read_json(mpath)
  diffs = runs.differences({"settings": _identity(found)}, {"settings": _identity(manifest)})
  if not diffs:
    return
  if jax.process_index() == 0 and overwrite:
    print(f"overwrite: deleting the activation store {path} (made with {runs.describe(diffs)})")
    shutil.rmtree(path)
    return
  if not overwrite:
    raise RunMismatchError(
        f"the activation store {path} was collected with other settings: {runs.describe(diffs)}.\n"
        "Collect into another --config.collect.store_path (or --config.workdir), or add "
        "--config.overwrite=True to delete it and collect again.")


def _identity(manifest: dict) -> dict:
  """A manifest's identity and layout as flat fields (what a store is)."""
  m = json.loads(json.dumps({"identity": manifest["identity"], "layout": manifest["layout"]}))
  return flat_fields(m)


def unit_batch(col: Collection, unit: int):
  """(prompt indices, seeds, n real rows) of a unit, padded to the sampler's batch."""
  steps, bs = col.config.sampler.num_steps, col.config.sampler.batch_size
  r0, r1 = store.unit_rows(col.store, unit)
  trajs = col.trajs[r0 // steps: r1 // steps]
  n = len(trajs)
  pidx = np.array([t[0] for t in trajs] + [trajs[0][0]] * (bs - n))
  seeds = np.array([t[1] for t in trajs] + [trajs[0][1]] * (bs - n), np.uint32)
  return pidx, seeds, n


def write_units(col: Collection, units: list[int], desc: str = "collect") -> None:
  """Samples each unit's trajectories with capture and writes them (in a background thread)."""
  steps = col.config.sampler.num_steps
  timesteps = col.sampler.timesteps.astype(np.int32)
  g = np.float32(col.config.sampler.guidance_scale)
  with store.UnitWriter(col.store) as writer:
    for u in tqdm(units, desc=desc, unit="unit"):
      pidx, seeds, n = unit_batch(col, u)
      out = col.sampler(col.pipe.params, col.cond_ids[pidx], col.uncond_ids, seeds, g)
      caps = np.asarray(out.captured[:, :n])  # (steps, n, h, w, d_in)
      acts = caps.transpose(1, 0, 2, 3, 4).reshape(n * steps, -1, caps.shape[-1])
      p = pidx[:n].repeat(steps)
      labels = {
          "object": [col.grid[i].object_id for i in p], "style": [col.grid[i].style_id for i in p],
          "timestep": np.tile(timesteps, n), "step": np.tile(np.arange(steps), n),
          "prompt": p, "seed": seeds[:n].repeat(steps),
      }
      writer.submit(u, acts, {k: np.asarray(v, np.int32) for k, v in labels.items()})


def run(config: ml_collections.ConfigDict) -> dict:
  if config.get("dry_run"):  # compile only: per-device memory and images/s (runtime/sizing.py)
    pipe = common.load_model(config, abstract=True)
    return sizing.sampler_dry_run(config, "collect", pipe, common.make_sampler(config, pipe, capture=True))
  if blocks.per_block(config):  # a store per block ({workdir}/{block}/activations)
    return {b: run(blocks.block_config(config, b)) for b in blocks.blocks(config)}
  initialize_distributed()  # several hosts (launch/): before anything touches a device
  c = config.collect
  col = prepare(config)
  pi = c.process_index if c.process_index >= 0 else jax.process_index()
  pc = c.process_count if c.process_count > 0 else jax.process_count()
  todo = store.pending_units(col.store, pi, pc)
  if c.max_units > 0:
    todo = todo[:c.max_units]
  t0 = time.perf_counter()
  write_units(col, todo, desc=f"collect (process {pi}/{pc})")
  wall = time.perf_counter() - t0
  s = store.summary(col.store)
  print(store.format_summary(s))
  print(f"process {pi}/{pc}: wrote {len(todo)} units in {wall:.1f} s")
  return {"path": col.store.path, "units_written": len(todo), "wall_s": wall, "summary": s}


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call."""
  del judge, progress
  return run(config)
