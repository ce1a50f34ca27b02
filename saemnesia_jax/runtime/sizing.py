"""Sizing a run before renting devices: ``--config.dry_run=True``.

  python -m saemnesia_jax.train --config configs/sd15.py --config.dry_run=True --config.topology=v5p-8
  python -m saemnesia_jax.collect --config configs/sd15.py --config.dry_run=True --config.topology=v5e-8

compiles a stage's real jitted programs from abstract inputs only
(``jax.ShapeDtypeStruct`` with a ``NamedSharding``; no weights or data read,
nothing allocated): train, its step (unsupervised: with both backwards,
compared); collect, its capturing sampler; evaluate, the clamp sampler;
sample, the sampler. With ``config.topology`` (a Cloud TPU slice name,
``runtime/topology.py``; needs ``pip install -e '.[tpu]'``) they are compiled
by the TPU compiler for that slice's devices, on this host, over the mesh a
real run builds (``train.mesh_shape``); without it, for the local devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` fakes CPU ones).

Per program it prints, and writes to ``{workdir}/dry_run/<program>.json``
(``layout.dry_run_file``): per-device argument, output and temporary bytes
against the chip's HBM (fits, headroom), the compiler's FLOPs and bytes
accessed, the roofline time of one call on the chip (max(FLOPs / bf16 peak,
bytes / HBM bandwidth)) and the tokens/s or images/s it implies, and the
collectives in the compiled program by kind with their bytes
(``runtime/hlo_stats.py``). A program that does not fit the chip's HBM is a
UserError (exit 2) naming the field to change. The samplers run on one device
per process in a real run (an unsharded jit), so they are compiled for one chip.

The activation width and the tokens per map come from the store when it
exists, else from the model's unet/config.json (and vae/config.json) for
``config.block`` at ``config.sampler`` size, so SD v1.5 can be sized before
anything is collected.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saemnesia_jax import store
from saemnesia_jax.diffusion import setup as model_setup
from saemnesia_jax.runtime import hlo_stats, layout, topology
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_json
from saemnesia_jax.sae import model as sae_lib
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
  block shape from its config files (nothing is collected or loaded;
  ``layout.model_config_dir``: SD v1.5's shipped ones when model.path has none)."""
  path = layout.store_path(config)
  if os.path.isfile(os.path.join(path, "manifest.json")):
    return store.open_store(path).shape
  mpath = model_setup.config_dir(config)  # the model's, or SD v1.5's shipped config files
  unet = json.load(open(os.path.join(mpath, "unet", "config.json")))
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
  return hlo_stats.size(n)


def _flop(n: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.3g} FLOP"


# ------------------------------------------------------------ the target


class Target:
  """The devices programs are compiled for: ``config.topology``'s slice or the local ones."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.name = config.get("topology", "") or ""
    if self.name:
      self.devices, self.chip = topology.devices(self.name), topology.resolve(self.name).chip
    else:
      self.devices = jax.devices()
      self.chip = topology.chip_of(self.devices[0].device_kind)
    self.device_kind = self.devices[0].device_kind
    self.platform = self.devices[0].platform
    self.peak_flops = self.chip.peak_bf16_flops if self.chip else peak_flops(self.device_kind)

  def describe(self) -> str:
    where = f"TPU slice {self.name} ({len(self.devices)} chips)" if self.name else f"{len(self.devices)} local devices"
    return f"{where}, {self.device_kind}"

  def one_device(self) -> NamedSharding:
    """Where an unsharded jit runs: the first device (a process's default)."""
    return NamedSharding(Mesh(np.array(self.devices[:1]), ("data",)), P())


def _compile(lowerable: Callable[[], Any], program: str, fix: str):
  """``lowerable().compile()``; the TPU compiler's out-of-memory as a UserError naming ``fix``."""
  try:
    return lowerable().compile()
  except Exception as e:  # the compiler raises XlaRuntimeError / JaxRuntimeError
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      first = " ".join(msg.strip().splitlines()[:3])[:600]
      raise UserError(f"dry run: {program} does not fit in device memory (the compiler: {first})\n"
                      f"lower {fix}") from e
    raise


def analyze(compiled: Any, tgt: Target, work_per_call: float) -> dict:
  """Memory, cost, roofline and collectives of one compiled program (per device)."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
  pb = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
        "aliased": get("alias_size_in_bytes"), "temporaries": get("temp_size_in_bytes"),
        "generated_code": get("generated_code_size_in_bytes"), "peak": get("peak_memory_in_bytes")}
  # Donated arguments alias outputs: live at once are the arguments, the new outputs, the temporaries.
  pb["total"] = max(pb["peak"], pb["arguments"] + pb["outputs"] - pb["aliased"] + pb["temporaries"])
  hbm = tgt.chip.hbm_bytes if tgt.chip else None
  flops = float(cost.get("flops", float("nan")))
  accessed = float(cost.get("bytes accessed", float("nan")))
  out = {"per_device_bytes": pb, "hbm_bytes": hbm, "fits": None if hbm is None else pb["total"] <= hbm,
         "headroom_bytes": None if hbm is None else hbm - pb["total"],
         "flops_per_device": flops, "bytes_accessed_per_device": accessed,
         "collectives": hlo_stats.collectives(compiled.as_text())}
  return roofline(out, tgt, work_per_call)


def roofline(a: dict, tgt: Target, work_per_call: float) -> dict:
  """``a`` with the roofline of its FLOPs and bytes on the target's chip (where it has a peak)."""
  if tgt.peak_flops:
    t_flops = a["flops_per_device"] / tgt.peak_flops
    t_mem = a["bytes_accessed_per_device"] / tgt.chip.hbm_bytes_per_s if tgt.chip else 0.0
    a.update(roofline_s=max(t_flops, t_mem), bound="memory" if t_mem > t_flops else "compute",
             throughput=work_per_call / max(t_flops, t_mem))
  return a


def _print_program(label: str, a: dict, unit: str, print_fn) -> None:
  pb = a["per_device_bytes"]
  fit = "" if a["hbm_bytes"] is None else (
      f" of {_gib(a['hbm_bytes'])} HBM: {'fits' if a['fits'] else 'DOES NOT FIT'}, "
      f"headroom {_gib(a['headroom_bytes'])}")
  print_fn(f"  {label}: per device arguments {_gib(pb['arguments'])}, outputs {_gib(pb['outputs'])} "
           f"({_gib(pb['aliased'])} aliased), temporaries {_gib(pb['temporaries'])}; total {_gib(pb['total'])}{fit}")
  line = (f"    {_flop(a['flops_per_device'])} and {_gib(a['bytes_accessed_per_device'])} accessed per device "
          "per call")
  if "roofline_s" in a:
    line += (f"; roofline {a['roofline_s'] * 1e3:.4g} ms ({a['bound']}-bound) -> "
             f"{a['throughput']:,.1f} {unit}/s")
  print_fn(line)
  if "loop" in a:
    print_fn(f"    (the denoising loop's body counted {a['loop']['trips']} times; XLA's own figures count it once)")
  if "cost_from" in a:
    print_fn(f"    (FLOPs and bytes from {a['cost_from']}: XLA counts the micro-batch loop's body once)")
  print_fn(f"    collectives per call: {hlo_stats.summary(a['collectives'])}")


def _finish(config, program: str, out: dict, fix: str, print_fn) -> dict:
  """Writes ``out`` to the workdir; refuses (UserError, exit 2) a program that does not fit."""
  path = layout.dry_run_file(config.workdir, program)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_write_json(path, out)
  print_fn(f"  wrote {path}")
  a = out["program"]
  if a["fits"] is False:
    raise UserError(
        f"dry run: {program} does not fit: {_gib(a['per_device_bytes']['total'])} per device (temporaries "
        f"{_gib(a['per_device_bytes']['temporaries'])}) of the {out['device_kind']}'s {_gib(a['hbm_bytes'])} HBM\n"
        f"lower {fix} (figures in {path})")
  return out


# ---------------------------------------------------------------- train


def _train_fix(config) -> str:
  if config.sae.mode == "supervised":
    return (f"train.batch_size={config.train.batch_size} or raise train.micro_batches="
            f"{config.train.micro_batches}, or shard the latents over more devices (train.mesh_shape)")
  return f"train.batch_size={config.train.batch_size}, or shard the latents over more devices (train.mesh_shape)"


def train_dry_run(config: ml_collections.ConfigDict, make_trainer: Callable[[Any, list], Any],
                  print_fn=print) -> dict:
  """Compiles the train step ``make_trainer(config, devices)`` builds (``train.setup``)
  for the target's mesh without data; unsupervised with ``sae.backward=auto``,
  with both backwards, the target platform's pick first (``sae/model.resolve_backward``).
  Returns (and prints, and writes) the sizing."""
  tgt = Target(config)
  cfg = ml_collections.ConfigDict(config.to_dict())  # a copy: the shapes do not depend on these
  cfg.sae.init_from = ""
  if cfg.sae.mode == "supervised":
    cfg.sae.assignment = "random"
  chosen = sae_lib.resolve_backward(cfg.sae.backward, tgt.platform)
  cfg.sae.selection = sae_lib.resolve_selection(cfg.sae.get("selection", "exact"), tgt.platform)  # the target's, not this host's
  compare = cfg.sae.mode == "unsupervised" and cfg.sae.backward == "auto"  # auto: is the platform's pick cheaper?
  backwards = [chosen] + ([b for b in ("sparse", "dense") if b != chosen] if compare else [])
  program = f"train_{config.train.name}"
  fix = _train_fix(config)
  out, compared = None, {}
  for backward in backwards:
    cfg.sae.backward = backward
    tr = make_trainer(cfg, tgt.devices)
    st, t, s = tr.shape, config.train, config.sae
    d_in, L = st.d_in, objectives.n_latents(config, st.d_in)
    tokens_per_step = tr.objective.tokens_per_step(t.batch_size, st.tokens_per_map)
    abstract = jax.eval_shape(tr.init_fn, jax.ShapeDtypeStruct((8, d_in), jnp.float32))
    state = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                   abstract, tr.state_shardings)
    batch = _abstract_batch(tr, t.batch_size, tgt)
    a = analyze(_compile(lambda: tr.step_fn.lower(state, batch), program, fix), tgt, tokens_per_step)
    if t.micro_batches > 1:
      a = _whole_batch_cost(cfg, make_trainer, tgt, state, a, tokens_per_step)
    compared[backward] = a
    if out is not None:
      continue
    out = {"program": a, "stage": "train", "mode": tr.mode, "topology": tgt.name, "device_kind": tgt.device_kind,
           "devices": len(tgt.devices), "mesh": dict(tr.mesh.shape), "backward": backward if tr.mode ==
           "unsupervised" else None, "d_in": d_in, "n_latents": L, "k": s.k, "batch_size": t.batch_size,
           "micro_batches": t.micro_batches, "tokens_per_step": tokens_per_step,
           "matmul_dtype": s.get("matmul_dtype") or "", "hbm_bytes_per_s": tgt.chip.hbm_bytes_per_s if tgt.chip
           else None, "peak_flops": tgt.peak_flops}
    out["per_device_bytes"] = {"params": _device_bytes(state["params"]),
                               "optimizer": _device_bytes(state["opt_state"]),
                               "dead_counter": _device_bytes(state["dead"]), "batch": _device_bytes(batch),
                               **a["per_device_bytes"]}
    out["xla_flops_per_device_step"] = a["flops_per_device"]
    # At the matmul peak of each accelerator, on as many devices (the compiler's FLOPs per device).
    out["predicted_tokens_per_s"] = {name: peak * tokens_per_step / a["flops_per_device"]
                                     for name, peak in PEAK_FLOPS.items()}
    pb = out["per_device_bytes"]
    print_fn(f"dry run: train ({tr.mode}), SAE d_in {d_in} x {L} latents, k {s.k}, "
             f"{'BatchTopK' if s.batch_topk else 'TopK'}; batch {t.batch_size} "
             f"{'maps x ' + str(st.tokens_per_map) + ' tokens' if tr.objective.per_map else 'tokens'}"
             f"{f' in {t.micro_batches} micro-batches' if t.micro_batches > 1 else ''}; mesh "
             f"{' x '.join(f'{k}={v}' for k, v in tr.mesh.shape.items())} on {tgt.describe()}")
    print_fn(f"  state per device: params {_gib(pb['params'])}, optimizer {_gib(pb['optimizer'])}, batch "
             f"{_gib(pb['batch'])}")
  if len(compared) > 1:
    out["backwards"] = compared
    cheaper = min(compared, key=lambda b: compared[b].get("roofline_s", compared[b]["flops_per_device"]))
    out["cheaper_backward"] = cheaper
  for backward, a in compared.items():
    label = f"step, {backward} backward" if out["backward"] else "step"
    _print_program(label + (" (the config's)" if len(compared) > 1 and backward == out["backward"] else ""),
                   a, "tokens", print_fn)
  if len(compared) > 1:
    print_fn(f"  cheaper by the compiler's roofline: the {out['cheaper_backward']} backward "
             f"(sae.backward=auto takes {out['backward']} on {tgt.platform})")
  return _finish(config, program, out, fix, print_fn)


def _abstract_batch(tr, batch_size: int, tgt: Target) -> dict:
  """The reader's batches (the store's dtype) as sharded ShapeDtypeStructs; a batch
  that does not split over the mesh's 'data' axis is a UserError."""
  st = tr.shape
  shapes = tr.objective.batch_shapes(batch_size, st.tokens_per_map, st.d_in, st.dtype,
                                     0 if tr.assignment is None else len(tr.assignment))
  n_data = tr.mesh.shape["data"]
  rows = {v.shape[0] for k, v in shapes.items() if k != "assignment"}
  if any(r % n_data for r in rows):
    raise UserError(f"config.train.batch_size={batch_size}: the batch's {max(rows)} rows do not split over the "
                    f"mesh's data={n_data} devices of {tgt.describe()}; give a multiple of {n_data} (or another "
                    "train.mesh_shape)")
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=tr.step_shardings[k]) for k, v in shapes.items()}


def _whole_batch_cost(cfg, make_trainer, tgt: Target, state, a: dict, tokens_per_step: int) -> dict:
  """``a`` with the FLOPs and bytes of the same step at ``train.micro_batches=1``: XLA's
  cost analysis counts the micro-batch loop's body once. Memory stays the micro-batched
  step's; where the whole batch does not fit the chip, the loop's figures are kept."""
  whole = ml_collections.ConfigDict(cfg.to_dict())
  whole.train.micro_batches = 1
  tr = make_trainer(whole, tgt.devices)
  batch = _abstract_batch(tr, whole.train.batch_size, tgt)
  try:
    w = analyze(_compile(lambda: tr.step_fn.lower(state, batch), "the whole batch", ""), tgt, tokens_per_step)
  except UserError:  # the compiler's out-of-memory for the whole batch
    a["cost_from"] = "the micro-batched step (loop body counted once: a lower bound)"
    return a
  a["counted_once"] = {"flops": a["flops_per_device"], "bytes": a["bytes_accessed_per_device"]}
  a.update(flops_per_device=w["flops_per_device"], bytes_accessed_per_device=w["bytes_accessed_per_device"],
           cost_from="the same step at train.micro_batches=1")
  return roofline(a, tgt, tokens_per_step)


# --------------------------------------------------------------- samplers


def sampler_dry_run(config: ml_collections.ConfigDict, stage: str, pipe: Any, sampler: Any,
                    edit_params: Any = None, print_fn=print) -> dict:
  """Compiles ``stage``'s sampler (sample; collect: capturing the block;
  evaluate: with the clamp and its abstract ``edit_params``) over an abstract
  pipeline (``setup.load_model(config, abstract=True)``: the model's config
  files alone, no weights) at the sampler's batch and size, for one device of
  the target; returns (and prints, and writes) its sizing."""
  tgt = Target(config)
  sh = tgt.one_device()
  put = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)
  bs = sampler.spec.batch_size
  ids = jax.ShapeDtypeStruct((bs, pipe.max_length), jnp.int32)
  args = put((pipe.params, ids, ids, jax.ShapeDtypeStruct((bs,), jnp.uint32),
              jax.ShapeDtypeStruct((), jnp.float32), edit_params))
  fix = f"sampler.batch_size={bs}" + (", or use model.dtype=bfloat16" if config.model.dtype == "float32" else "")
  a = analyze(_compile(lambda: sampler.fn.lower(*args), stage, fix), tgt, bs)
  # XLA's cost analysis counts a loop's body once: the denoising step is compiled on its
  # own and its FLOPs and bytes are added for the loop's other num_steps - 1 trips.
  n = sampler.spec.num_steps
  ctx = jax.eval_shape(pipe.encode_text, pipe.params, jax.ShapeDtypeStruct((2 * bs, pipe.max_length), jnp.int32))
  state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                 sampler.scheduler_state)
  step_args = put((pipe.params, ctx, jax.ShapeDtypeStruct((), jnp.float32), edit_params,
                   (jax.ShapeDtypeStruct((bs, *sampler.latent_shape), jnp.float32), state),
                   jax.ShapeDtypeStruct((), jnp.int32)))
  body = analyze(_compile(lambda: jax.jit(sampler.denoise_step).lower(*step_args), stage, fix), tgt, bs)
  a["loop"] = {"trips": n, "body_flops": body["flops_per_device"], "body_bytes": body["bytes_accessed_per_device"],
               "counted_once": {"flops": a["flops_per_device"], "bytes": a["bytes_accessed_per_device"]}}
  a["flops_per_device"] += (n - 1) * body["flops_per_device"]
  a["bytes_accessed_per_device"] += (n - 1) * body["bytes_accessed_per_device"]
  roofline(a, tgt, bs)
  weights = int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(pipe.params)))
  flops = a["flops_per_device"]
  out = {"program": a, "stage": stage, "topology": tgt.name, "device_kind": tgt.device_kind, "devices": 1,
         "slice_devices": len(tgt.devices), "batch_size": bs, "height": sampler.height, "width": sampler.width,
         "num_steps": sampler.spec.num_steps, "dtype": config.model.dtype,
         "per_device_bytes": {"weights": weights, **a["per_device_bytes"]},
         "xla_flops_per_call": flops,
         "predicted_images_per_s": {k: peak / (flops / bs) for k, peak in PEAK_FLOPS.items()}}
  print_fn(f"dry run: {stage} sampler, {bs} images of {sampler.height}x{sampler.width} px with CFG "
           f"({2 * bs} UNet rows), {sampler.spec.num_steps} steps, {config.model.dtype}, on one device of "
           f"{tgt.describe()}")
  print_fn(f"  weights {_gib(weights)}, {_flop(flops / bs)} per image")
  _print_program("sampler", a, "images", print_fn)
  return _finish(config, stage, out, fix, print_fn)


def one_device_dry_run(config: ml_collections.ConfigDict, program: str, fn: Any, args: Any, work_per_call: float,
                       unit: str, fix: str, info: dict, title: str, print_fn=print) -> dict:
  """Compiles the jitted ``fn`` at the abstract ``args`` for one device of the
  target (as a real run places it: one process, its default device); prints,
  writes and refuses (exit 2) what does not fit, as the samplers' dry run does."""
  tgt = Target(config)
  sh = tgt.one_device()
  args = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), args)
  a = analyze(_compile(lambda: fn.lower(*args), program, fix), tgt, work_per_call)
  out = {"program": a, "stage": program, "topology": tgt.name, "device_kind": tgt.device_kind, "devices": 1,
         "slice_devices": len(tgt.devices), **info}
  print_fn(f"dry run: {title}, on one device of {tgt.describe()}")
  _print_program(program, a, unit, print_fn)
  return _finish(config, program, out, fix, print_fn)
