"""Sizing a training run before renting devices: ``--config.dry_run=True``.

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m saemnesia_jax.train --config configs/sd15.py --config.dry_run=True

builds the train state abstractly (``jax.eval_shape``: nothing is allocated),
compiles the training step for the configured mesh without running it and
prints per device: parameter, optimizer-state and dead-counter bytes (from
the state's shardings), XLA's temporaries and argument/output sizes of the
compiled step, its FLOPs, and the tokens/s the step would reach at the
matmul peak of common accelerators. Fake CPU devices (the XLA flag above)
stand for the devices to rent; the temporaries are those of the CPU compile
(GPU and TPU compilers fuse differently, so take them as an estimate).

The activation width and the tokens per map come from the store when it
exists, else from the model's unet/config.json (and vae/config.json) for
``config.block`` at ``config.sampler`` size, so SD v1.5 can be sized before
anything is collected.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saemnesia_jax import store
from saemnesia_jax.runtime import layout
from saemnesia_jax.sae import objectives

# Dense bf16 matmul peak per chip (vendor figures), FLOP/s.
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}


def peak_flops(device_kind: str) -> float | None:
  for name, flops in PEAK_FLOPS.items():
    if device_kind.startswith(name):
      return flops
  return None


def block_shape(unet_config: dict, vae_levels: int, block: str, height: int) -> tuple[int, int]:
  """(tokens per map, width) of a hooked UNet block's output at ``height`` pixels."""
  boc = list(unet_config["block_out_channels"])
  n = len(boc)
  latent = height // 2 ** max(vae_levels - 1, 0)
  parts = block.split(".")
  if parts[0] == "mid_block":
    level, width = n - 1, boc[-1]
  elif parts[0] == "down_blocks":
    level, width = int(parts[1]), boc[int(parts[1])]
  elif parts[0] == "up_blocks":
    level, width = n - 1 - int(parts[1]), boc[::-1][int(parts[1])]
  else:
    raise ValueError(f"config.block={block!r}: expected down_blocks.i..., mid_block... or up_blocks.i...")
  side = latent // 2 ** level
  return side * side, width


def shape_record(config: ml_collections.ConfigDict) -> store.ShapeRecord:
  """The store's shape record when the store exists, else one with the model's
  block shape from its config files (nothing is collected or loaded)."""
  path = layout.store_path(config)
  if os.path.isfile(os.path.join(path, "manifest.json")):
    return store.open_store(path).shape
  mpath = layout.model_dir(config)
  unet_cfg = os.path.join(mpath, "unet", "config.json")
  if not os.path.isfile(unet_cfg):
    raise FileNotFoundError(
        f"dry run: no activation store at {path} and no {unet_cfg} to size the block from: "
        "set --config.model.path to the pipeline directory (only its config.json files are read)")
  unet = json.load(open(unet_cfg))
  vae_cfg = os.path.join(mpath, "vae", "config.json")
  vae_levels = len(json.load(open(vae_cfg))["block_out_channels"]) if os.path.isfile(vae_cfg) else 1
  height = config.sampler.height or unet["sample_size"] * 2 ** (vae_levels - 1)
  tokens, width = block_shape(unet, vae_levels, config.block, height)
  return store.ShapeRecord(config.sae.d_in or width, tokens, store.DTYPES[config.collect.dtype],
                           tuple(config.concepts.objects), tuple(config.concepts.styles), config.block)


def _device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  return int(sum(np.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
                 for s in jax.tree_util.tree_leaves(tree)))


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def train_dry_run(config: ml_collections.ConfigDict, tr: Any, print_fn=print) -> dict:
  """Compiles the trainer ``tr``'s step for its mesh without data; returns (and prints) the sizing."""
  st = tr.shape
  t = config.train
  d_in, L = st.d_in, objectives.n_latents(config, st.d_in)
  sup = tr.mode == "supervised"
  x_shape = (t.batch_size, st.tokens_per_map, d_in) if sup else (t.batch_size, d_in)
  tokens_per_step = int(np.prod(x_shape[:-1]))
  abstract = jax.eval_shape(tr.init_fn, jax.ShapeDtypeStruct((8, d_in), jnp.float32))
  state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract, tr.state_shardings)
  sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  # The reader's batches: the store's dtype.
  shapes = tr.objective.batch_shapes(t.batch_size, st.tokens_per_map, d_in, st.dtype,
                                     0 if tr.assignment is None else len(tr.assignment))
  batch = {k: sds(v.shape, v.dtype, tr.step_shardings[k]) for k, v in shapes.items()}
  compiled = tr.step_fn.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", float("nan")))
  # Matmul FLOPs per token by hand (as benchmarks/train_step.py): encoder
  # forward + weight gradient 4dL; dense decoder forward + both gradients 6dL,
  # or 6kd gathering the k active rows.
  s = config.sae
  hand = 4 * d_in * L + (6 * s.k * d_in if s.sparse_decode else 6 * d_in * L)
  # The unsupervised step with the sparse backward (sae.backward; auto: sparse
  # except on TPU): the encoder forward 2dL plus O(k) gathers and scatters
  # (about 8kd), AuxK left out (0 while nothing is dead).
  hand_sparse = 2 * d_in * L + 8 * s.k * d_in if not sup and s.backward != "dense" else hand
  n_dev = tr.mesh.size
  out = {
      "mode": tr.mode, "d_in": d_in, "n_latents": L, "batch_size": t.batch_size,
      "tokens_per_step": tokens_per_step, "mesh": dict(tr.mesh.shape), "devices": n_dev,
      "device_kind": jax.devices()[0].device_kind,
      "per_device_bytes": {
          "params": _device_bytes(state["params"]), "optimizer": _device_bytes(state["opt_state"]),
          "dead_counter": _device_bytes(state["dead"]), "batch": _device_bytes(batch),
          "temporaries": int(mem.temp_size_in_bytes) if mem is not None else None,
          "arguments": int(mem.argument_size_in_bytes) if mem is not None else None,
          "outputs": int(mem.output_size_in_bytes) if mem is not None else None},
      "xla_flops_per_device_step": xla_flops, "hand_flops_per_token": hand,
  }
  pb = out["per_device_bytes"]
  # The state is donated: outputs reuse the argument buffers.
  pb["total"] = pb["params"] + pb["optimizer"] + pb["dead_counter"] + pb["batch"] + (pb["temporaries"] or 0)
  def flops_on(name: str) -> float:  # 'auto' runs the dense backward on TPUs
    return hand if s.backward == "auto" and name.startswith("TPU") else hand_sparse
  out["hand_flops_per_token_sparse"] = hand_sparse
  out["predicted_tokens_per_s"] = {name: peak / flops_on(name) * n_dev for name, peak in PEAK_FLOPS.items()}
  here = peak_flops(out["device_kind"])
  out["predicted_tokens_per_s_here"] = None if here is None else here / flops_on(out["device_kind"]) * n_dev
  print_fn(f"dry run: train ({tr.mode}), SAE d_in {d_in} x {L} latents, k {s.k}, "
           f"{'BatchTopK' if s.batch_topk else 'TopK'}; batch {t.batch_size} "
           f"{'maps x ' + str(st.tokens_per_map) + ' tokens' if sup else 'tokens'}; mesh "
           f"{' x '.join(f'{k}={v}' for k, v in tr.mesh.shape.items())} ({n_dev} {out['device_kind']} devices)")
  print_fn(f"  per device: params {_gib(pb['params'])}, optimizer {_gib(pb['optimizer'])}, batch "
           f"{_gib(pb['batch'])}, step temporaries {_gib(pb['temporaries'] or 0)}; total {_gib(pb['total'])}")
  print_fn(f"  FLOPs per step: {xla_flops / 1e12:.3f} T per device (XLA); by hand {hand / 1e6:.1f} M per token "
           f"x {tokens_per_step} tokens = {hand * tokens_per_step / 1e12:.3f} T"
           + (f" dense, {hand_sparse / 1e6:.1f} M per token with the sparse backward" if hand_sparse != hand else ""))
  print_fn("  predicted tokens/s at the bf16 matmul peak, all devices: " + ", ".join(
      f"{n} {v:,.0f}" for n, v in out["predicted_tokens_per_s"].items()))
  if here is not None:
    print_fn(f"  on this device kind ({out['device_kind']}): {out['predicted_tokens_per_s_here']:,.0f} tokens/s")
  return out


def sampler_dry_run(config: ml_collections.ConfigDict, stage: str, pipe: Any, sampler: Any,
                    edit_params: Any = None, print_fn=print) -> dict:
  """Compiles ``stage``'s sampler (sample; collect: capturing the block;
  evaluate: with the clamp and its abstract ``edit_params``) over an abstract
  pipeline (``setup.load_model(config, abstract=True)``: the model's config
  files alone, no weights) at the sampler's batch and size; returns (and
  prints) its per-device memory and the images/s it would reach at the matmul peak."""
  bs = sampler.spec.batch_size
  ids = jax.ShapeDtypeStruct((bs, pipe.max_length), jnp.int32)
  compiled = sampler.fn.lower(pipe.params, ids, ids, jax.ShapeDtypeStruct((bs,), jnp.uint32),
                              jax.ShapeDtypeStruct((), jnp.float32), edit_params).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  weights = int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(pipe.params)))
  temp = int(mem.temp_size_in_bytes) if mem is not None else 0
  out = {"stage": stage, "batch_size": bs, "height": sampler.height, "width": sampler.width,
         "num_steps": sampler.spec.num_steps, "dtype": config.model.dtype,
         "device_kind": jax.devices()[0].device_kind,
         "per_device_bytes": {"weights": weights, "temporaries": temp,
                              "outputs": int(mem.output_size_in_bytes) if mem is not None else None,
                              "total": weights + temp},
         "xla_flops_per_call": flops,
         "predicted_images_per_s": {k: peak / (flops / bs) for k, peak in PEAK_FLOPS.items()}}
  print_fn(f"dry run: {stage} sampler, {bs} images of {sampler.height}x{sampler.width} px with CFG "
           f"({2 * bs} UNet rows), {sampler.spec.num_steps} steps, {config.model.dtype}, on one "
           f"{out['device_kind']} device")
  print_fn(f"  per device: weights {_gib(weights)}, sampler temporaries {_gib(temp)}; total {_gib(weights + temp)}")
  print_fn(f"  FLOPs per call: {flops / 1e12:.2f} T (XLA), {flops / bs / 1e12:.2f} T per image")
  print_fn("  predicted images/s at the bf16 matmul peak: " + ", ".join(
      f"{k} {v:,.1f}" for k, v in out["predicted_images_per_s"].items()))
  return out
