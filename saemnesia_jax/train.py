"""Stage `train`: the sparse autoencoder, unsupervised (SAeUron) or supervised (SAEmnesia).

  python -m saemnesia_jax.train --config configs/canvas_mini.py --config.sae.k=8
  python -m saemnesia_jax.train --config configs/canvas_mini.py --config.sae.mode=supervised \\
      --config.sae.init_from=runs/canvas_mini/sae_unsup/export --config.sae.assignment=greedy

Reads the activation store written by `collect` (refusing one made by another
model, block or width), trains with one jitted step under a ``jax.sharding``
mesh ('data' x 'model'; parameters placed by ``config.train.sharding_rules``,
the latent axis on 'model', batches on 'data'), and writes into
``{workdir}/{config.train.name}/``:

  checkpoints/   orbax: train state (params, Adam state, step, dead-latent
                 counters), the reader's position, accounting (tokens, wall
                 time, early-stopping state) and the config as JSON
  metrics.jsonl  loss terms, FVU, L0, dead fraction, concept-latent accuracy
                 (supervised), tokens/s, every ``log_every`` steps
  export/        the SAE at the end of the schedule, or with train.early_stop
                 the best one (lowest validation loss), in sparsify's layout
                 (cfg.json + sae.safetensors) + saemnesia.json (mode, store
                 identity, concept names, assignment)

A rerun with the same config resumes from the latest checkpoint exactly
(parameters, optimizer, reader position, counters).

Unsupervised step (docs/method.md section 2): tokens -> FVU + AuxK/32 (BatchTopK or
TopK), decoder rows unit norm after each step with the parallel gradient
component removed, Adam with linear decay, clipping 1.0. Supervised step
(section 3): whole maps with their labels -> MSE + w_sup * BCE (or softmax CE)
over the assigned latents + w_l1 * mean|z| + w_decorr * decorrelation.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("train")

import copy
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from saemnesia_jax import store
from saemnesia_jax.diffusion import blocks, models
from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.runtime import layout, runs
from saemnesia_jax.runtime import sharding as shard_lib
from saemnesia_jax.runtime import sizing, tensorboard
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_json, dumps
from saemnesia_jax.runtime.units import initialize_distributed
from saemnesia_jax.sae import artifacts
from saemnesia_jax.sae import model as sae_lib
from saemnesia_jax.sae import checkpoints, objectives, sparsify_io, supervised

MODES = ("unsupervised", "supervised")
# Train fields that cannot change the trained SAE: where it goes, how often it
# logs and saves, how it is placed on devices.
NOT_RESULT = ("train.name", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
              "train.stop_after", "train.mesh_shape", "train.sharding_rules", "train.check_model",
              "train.style_block_epochs", "train.micro_batches", "sae.scores_dir", "sae.init_from",
              "sae.backward")  # the sparse and dense backward give the same SAE
# A finished run trains on to a larger step count (given directly or in epochs).
CONTINUABLE = ("train.steps", "train.epochs")
run_dir = layout.run_dir


class NonFiniteLossError(UserError):
  """The loss became NaN or inf: training stops, exporting nothing."""


# ------------------------------------------------------------------ the step


def train_step(state: dict, batch: dict, *, objective: objectives.Objective, tx: optax.GradientTransformation,
               dead_tokens_threshold: int) -> tuple[dict, dict]:
  """One update of the train state (params, opt_state, step, dead counters) on one batch."""
  batch = {**batch, "x": batch["x"].astype(state["params"]["W_enc"].dtype)}  # batches come in the store's dtype
  dead = sae_lib.dead_mask(state["dead"], dead_tokens_threshold)
  (loss, aux), grads = objective.value_and_grad(state["params"], dead, batch)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = sae_lib.normalize_decoder(optax.apply_updates(state["params"], updates))
  n_tokens = batch["x"].shape[0] * (batch["x"].shape[1] if batch["x"].ndim == 3 else 1)
  metrics = objectives.metrics_of(aux, loss)
  metrics["dead_fraction"] = jnp.mean(dead.astype(jnp.float32))
  return dict(params=params, opt_state=opt_state, step=state["step"] + 1,
              dead=sae_lib.update_dead_counter(state["dead"], aux["fired"], n_tokens)), metrics


def eval_step(params: dict, batch: dict, *, objective: objectives.Objective) -> dict:
  """The objective's terms on a validation batch (nothing counted as dead)."""
  batch = {**batch, "x": batch["x"].astype(params["W_enc"].dtype)}
  loss, aux = objective.loss(params, jnp.zeros((params["W_enc"].shape[1],), bool), batch)
  return objectives.metrics_of(aux, loss)


# ------------------------------------------------------------------ set-up


def open_training_store(config: ml_collections.ConfigDict) -> store.Store:
  """The activation store, checked against the config's model and block."""
  path = layout.store_path(config)
  st = store.open_store(path)
  expected: dict[str, Any] = {"block": config.block}
  if config.train.check_model:
    mpath = layout.model_dir(config)
    if os.path.isdir(mpath):
      expected["weights_sha256"] = models.weights_hash(mpath, common.from_pt(config))
  store.check_identity(st, **expected)
  sae_d_in = config.sae.d_in
  if sae_d_in and sae_d_in != st.d_in:
    raise store.ManifestMismatchError(
        f"the store at {path} holds activations of width {st.d_in}, but config.sae.d_in={sae_d_in}: "
        f"collect a store at the block this SAE is for, or set --config.sae.d_in={st.d_in} (0 = from the store)")
  return st


def load_assignment(config, shape: store.ShapeRecord, rng) -> np.ndarray:
  """Concept -> latent ids (objects first), from config.sae.assignment."""
  n_obj, n_sty = len(shape.objects), len(shape.styles)
  how = config.sae.assignment
  L = objectives.n_latents(config, shape.d_in)
  if how == "random":
    return np.asarray(supervised.random_assignment(rng, n_obj, n_sty, L))
  path = how
  if how == "greedy":
    path = os.path.join(layout.scores_dir_for_assignment(config), artifacts.ASSIGNMENT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no concept->latent assignment at {path}: run the scores stage on an unsupervised SAE first "
        "(python -m saemnesia_jax.scores --config ...), or use --config.sae.assignment=random")
  ids = np.asarray(artifacts.load_assignment(path, shape.objects, shape.styles), np.int32)
  if len(ids) != n_obj + n_sty or ids.max() >= L:
    raise ValueError(f"assignment {path} has {len(ids)} entries (max {ids.max()}) but the store has "
                     f"{n_obj} objects + {n_sty} styles and the SAE {L} latents")
  return ids


@dataclasses.dataclass
class Trainer:
  """Everything one training run holds; built by ``setup``."""
  config: Any
  shape: store.ShapeRecord
  objective: objectives.Objective
  mesh: Any
  tx: Any
  state_shardings: Any
  batch_sharding: Any  # of the data axes ('data')
  step_shardings: dict  # of each field of the step's batch
  step_fn: Any
  eval_fn: Any
  init_fn: Any
  assignment: np.ndarray | None
  assignment_on_mesh: Any = None  # the assignment, placed once (replicated)

  @property
  def mode(self) -> str:
    return self.objective.name


def setup(config: ml_collections.ConfigDict, shape: store.ShapeRecord, devices=None) -> Trainer:
  """The jitted step, evaluation and initialisation of ``config`` for a store of ``shape`` (on ``devices``: all)."""
  mode = config.sae.mode
  if mode not in MODES:
    raise ValueError(f"config.sae.mode={mode!r}; expected one of {MODES}")
  d_in, L = shape.d_in, objectives.n_latents(config, shape.d_in)
  mesh = shard_lib.make_mesh(config.train.mesh_shape, devices=devices)
  rules = [tuple(r) for r in config.train.sharding_rules]
  tx = objectives.optimizer_from_config(config.train)
  rng = jax.random.PRNGKey(config.train.seed)
  assignment = load_assignment(config, shape, rng) if mode == "supervised" else None
  objective = objectives.from_config(config, len(shape.objects))

  def init_fn(x_sample):
    if config.sae.init_from:
      params, _ = sparsify_io.load_sparsify(config.sae.init_from, dtype=np.float32)
      if params["W_enc"].shape != (d_in, L):
        raise ValueError(f"init_from {config.sae.init_from}: SAE of shape {params['W_enc'].shape}, "
                         f"this run needs (d_in, n_latents) = {(d_in, L)}")
      params = {k: jnp.asarray(v) for k, v in params.items()}
    else:
      params = sae_lib.init_params(rng, d_in, L, x_sample)
    return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                dead=sae_lib.init_dead_counter(L))

  abstract = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((8, d_in), jnp.float32))
  rep = shard_lib.replicated(mesh)
  param_sh = shard_lib.tree_shardings(mesh, abstract["params"], rules)
  opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], param_sh,
                                            transform_non_params=lambda _: rep)
  state_sh = dict(params=param_sh, opt_state=opt_sh, step=rep,
                  dead=NamedSharding(mesh, P(*shard_lib.spec_for("b_enc", rules))))
  batch_sh = shard_lib.batch_sharding(mesh)
  # Maps and labels over 'data'; the assignment replicated.
  step_batch_sh = {k: rep if k == "assignment" else batch_sh
                   for k in objective.batch_shapes(1, 1, d_in, shape.dtype, 0)}
  step = functools.partial(train_step, objective=objective, tx=tx,
                           dead_tokens_threshold=config.sae.dead_tokens)
  step_fn = jax.jit(step, in_shardings=(state_sh, step_batch_sh), out_shardings=(state_sh, rep),
                    donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, objective=objective), in_shardings=(param_sh, step_batch_sh),
                    out_shardings=rep)
  init_jit = jax.jit(init_fn, out_shardings=state_sh)
  # A dry run's devices may be compile-only (a TPU slice from this host): nothing is placed.
  placed = None if assignment is None or config.get("dry_run") else jax.device_put(jnp.asarray(assignment), rep)
  return Trainer(config, shape, objective, mesh, tx, state_sh, batch_sh, step_batch_sh, step_fn, eval_fn,
                 init_jit, assignment, placed)


# ----------------------------------------------------------------- data


def make_reader(tr: Trainer, st: store.Store, split: str, state: dict | None = None, shuffle: bool = True,
                num_epochs: int | None = None, **reader_kw):
  """The store reader of this run; ``reader_kw`` (e.g. process_index /
  process_count) go to the reader."""
  t = tr.config.train
  # dtype=None: batches in the store's dtype (bfloat16 at SD scale), cast to
  # float32 inside the jitted step: half the host's gather and the bytes sent
  # to the devices.
  kw = dict(seed=t.seed, split=split, val_fraction=t.val_fraction, split_seed=t.seed,
            shuffle=shuffle, num_epochs=num_epochs, state=state, buffer_chunks=t.buffer_chunks,
            prefetch=shuffle, dtype=None, **reader_kw)
  cls = store.MapBatches if tr.objective.reads_maps else store.TokenBatches
  return cls(st, tr.objective.reader_batch_size(t.batch_size, st.tokens_per_map), **kw)


def place(tr: Trainer, raw) -> dict:
  """A reader batch -> a dict of global arrays on the mesh."""
  batch = store.to_global(tr.objective.batch_of(raw), tr.batch_sharding)
  if tr.assignment_on_mesh is not None:
    batch["assignment"] = tr.assignment_on_mesh
  return batch


def validate(tr: Trainer, st: store.Store, params) -> dict | None:
  if tr.config.train.val_fraction <= 0:
    return None
  sums, n = {}, 0
  for raw in make_reader(tr, st, "val", shuffle=False, num_epochs=1):
    m = jax.device_get(tr.eval_fn(params, place(tr, raw)))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
    if n >= tr.config.train.val_batches:
      break
  return {k: v / max(n, 1) for k, v in sums.items()} if n else None


# ----------------------------------------------------------- checkpoints


def checkpoint_manager(config) -> ocp.CheckpointManager:
  return checkpoints.manager(os.path.join(run_dir(config), layout.CHECKPOINTS), config.train.keep_checkpoints)


def export(tr: Trainer, st: store.Store, params, meta: dict) -> str:
  """The SAE in sparsify's layout + saemnesia.json (what produced it)."""
  out = os.path.join(run_dir(tr.config), layout.EXPORT)
  s = tr.config.sae
  cfg = {"k": s.k, "batch_topk": s.batch_topk, "normalize_decoder": True}
  sparsify_io.save_sparsify(jax.device_get(params), cfg, out, overwrite=True)
  grid = st.manifest["identity"]["prompt_grid"]
  atomic_write_json(os.path.join(out, artifacts.META_FILE), {
      "mode": tr.mode, "store": st.path, "store_identity": st.manifest["identity"],
      "block": st.manifest["identity"]["block"], "objects": grid["objects"],
      "styles": grid["styles"],
      "assignment": None if tr.assignment is None else [int(i) for i in tr.assignment],
      "sae": tr.config.sae.to_dict(), "step": meta["step"], "tokens_seen": meta["tokens_seen"],
      "val": meta.get("best_val") if tr.config.train.early_stop else meta.get("last_val"),
      "early_stop": bool(tr.config.train.early_stop)})
  return out


def fingerprint(tr: Trainer, st: store.Store) -> dict:
  """The settings and inputs that determine this run's SAE (see runtime/runs.py)."""
  c = tr.config
  inputs = runs.store_identity(st.manifest, len(store.done_units(st)))
  if c.sae.init_from:
    inputs["init_from"] = runs.sae_hash(c.sae.init_from)
  if tr.assignment is not None:
    inputs["assignment"] = [int(i) for i in tr.assignment]
  # matmul_dtype at its default is the only behaviour runs made before the
  # field existed can have had: left out then, so that those runs still match.
  default_matmul = () if c.sae.get("matmul_dtype") else ("sae.matmul_dtype",)
  return runs.make(c, ("block", "sae", "train"), NOT_RESULT + default_matmul, inputs, stage="train")


# ------------------------------------------------------------------ loop


def steps_per_epoch(config: ml_collections.ConfigDict, st: store.Store) -> int:
  """Batches of ``config.train.batch_size`` in one pass over the train split
  (tokens unsupervised, maps supervised), as the trainer's reader draws them."""
  t, objective = config.train, objectives.from_config(config, len(st.shape.objects))
  cls = store.MapBatches if objective.reads_maps else store.TokenBatches
  reader = cls(st, objective.reader_batch_size(t.batch_size, st.tokens_per_map), seed=t.seed, split="train", val_fraction=t.val_fraction, split_seed=t.seed,
               shuffle=False, prefetch=False, buffer_chunks=t.buffer_chunks)
  return reader.batches_per_epoch()


def with_epoch_steps(config: ml_collections.ConfigDict, st: store.Store | None = None) -> ml_collections.ConfigDict:
  """``config`` with ``train.steps`` = ceil(train.epochs x steps per epoch of the
  store actually collected); unchanged when ``train.epochs`` is 0."""
  epochs = float(config.train.epochs)
  if epochs < 0:
    raise ValueError(f"config.train.epochs={epochs}: give a number of epochs, or 0 to use config.train.steps")
  if not epochs:
    return config
  st = st or store.open_store(layout.store_path(config))
  per_epoch = steps_per_epoch(config, st)
  steps = max(1, int(np.ceil(epochs * per_epoch)))
  unit = "tokens" if config.sae.mode == "unsupervised" else "maps"
  print(f"train.epochs={epochs:g} of the train split of {st.path} ({per_epoch} batches of "
        f"{config.train.batch_size} {unit} per epoch) -> train.steps={steps}")
  out = copy.deepcopy(config)
  out.train.steps = steps
  return out


def init_sample(tr: Trainer, local_tokens) -> jax.Array:
  """The tokens of the b_dec initialisation as one global array: every
  process's first ``init_tokens / process_count`` (so that all hosts
  initialise from the same data), cut to a multiple of the local data shards."""
  shards = max(1, tr.mesh.shape["data"] // jax.process_count())
  n = min(len(local_tokens), max(tr.config.train.init_tokens // jax.process_count(), shards))
  n -= n % shards
  return store.to_global(np.asarray(local_tokens[:n], np.float32), tr.batch_sharding)


def train(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains (or resumes) the SAE of ``config``; returns the final metrics."""
  if blocks.per_block(config):
    raise ValueError(f"config.block and config.style_block differ ({blocks.blocks(config)}): train each with "
                     "train.run(config) (the CLI), or train.train(blocks.block_config(config, block))")
  initialize_distributed()  # several hosts (launch/): before anything touches a device
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  st = open_training_store(config)
  config = with_epoch_steps(config, st)  # before setup: the learning-rate schedule spans the steps
  tr = setup(config, st.shape)
  t = config.train
  out_dir = run_dir(config)
  # The data must give a batch of each split before the run folder records
  # anything: a refused run leaves no fingerprint.json to refuse its fix.
  first = next(make_reader(tr, st, "train"))  # also the geometric-median init of b_dec
  if t.val_fraction > 0:
    next(make_reader(tr, st, "val", shuffle=False, num_epochs=1), None)
  runs.begin(out_dir, fingerprint(tr, st), overwrite=runs.overwrite(config), continuable=CONTINUABLE,
             fresh="--config.train.name=<new name>", write=jax.process_index() == 0,
             keep=(config.workdir, st.path, layout.model_dir(config)))
  mngr = checkpoint_manager(config)
  reader = None
  x0 = jax.ShapeDtypeStruct((t.batch_size, st.d_in), jnp.float32)
  restored = checkpoints.restore(mngr, tr.init_fn, tr.state_shardings, x0)
  if restored is not None:
    state, reader_state, meta = restored
    reader = make_reader(tr, st, "train", state=reader_state)
    if meta["stopped_early"] or meta["step"] >= t.steps:
      print(f"{out_dir} is complete (step {meta['step']}"
            f"{', stopped early' if meta['stopped_early'] else ''}): nothing to train")
    else:
      print(f"resumed {out_dir} at step {meta['step']} of {t.steps}")
  else:
    reader = make_reader(tr, st, "train")
    sample = first[0].reshape(-1, st.d_in) if tr.objective.reads_maps else first
    state = tr.init_fn(init_sample(tr, sample))
    meta = {"step": 0, "tokens_seen": 0, "wall_s": 0.0, "best_val": None, "bad_evals": 0,
            "stopped_early": False, "config": config.to_dict()}
  primary = jax.process_index() == 0  # several hosts: one writes the logs and the export
  if primary:
    atomic_write_json(os.path.join(out_dir, "config.json"), config.to_dict())
  tokens_per_step = tr.objective.tokens_per_step(t.batch_size, st.tokens_per_map)
  start = int(meta["step"])
  # `tensorboard --logdir {workdir}`; a rerun drops what was logged past its checkpoint (all, without one).
  logged = checkpoints.keep_metrics_until(os.path.join(out_dir, layout.METRICS), start, write=primary)
  log_f = open(os.path.join(out_dir, layout.METRICS) if primary else os.devnull, "a")
  curves = tensorboard.ScalarWriter(out_dir, enabled=primary, purge_from=start + 1 if logged or restored else None)
  pbar = tqdm(total=t.steps, initial=start, desc=f"train SAE ({tr.mode})", unit="step",
              disable=not progress)
  t_last, step_last, last = time.perf_counter(), start, {}
  wall0 = time.perf_counter() - meta["wall_s"]
  step, pending = start, None  # pending: (step, loss) not yet checked (one step behind: no stall)

  def stop_if_not_finite():  # before a log line, a checkpoint, the export: never of a diverged state
    nonlocal pending
    if pending is not None and not np.isfinite(float(pending[1])):
      pbar.close()
      mngr.wait_until_finished()
      log_f.close()
      curves.close()
      raise NonFiniteLossError(
          f"train: the loss is {float(pending[1])} at step {pending[0]}: the run diverged and stopped; nothing "
          f"was exported. The last checkpoint is step {mngr.latest_step()} in {mngr.directory} (a rerun "
          "resumes there). Lower train.learning_rate, or check the store for non-finite activations.")
    pending = None

  while step < t.steps and not meta["stopped_early"]:
    batch = place(tr, next(reader))
    state, m = tr.step_fn(state, batch)
    stop_if_not_finite()  # the previous step's, while this one runs
    step += 1
    pending = (step, m["loss"])
    meta["step"], meta["tokens_seen"] = step, meta["tokens_seen"] + tokens_per_step
    pbar.update(1)
    if runs.itstime(step, t.log_every, t.steps):
      stop_if_not_finite()
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      now = time.perf_counter()
      m.update(step=step, tokens=meta["tokens_seen"],
               tokens_per_s=(step - step_last) * tokens_per_step / (now - t_last),
               tokens_per_s_per_device=(step - step_last) * tokens_per_step / (now - t_last) / tr.mesh.size)
      t_last, step_last = now, step
      if runs.itstime(step, t.eval_every, t.steps):
        v = validate(tr, st, state["params"])
        if v is not None:
          m.update({f"val_{k}": x for k, x in v.items()})
          meta["last_val"] = v["loss"]
          if meta["best_val"] is None or v["loss"] < meta["best_val"] - t.min_delta:
            meta["best_val"], meta["bad_evals"] = v["loss"], 0
            if t.early_stop and primary:  # export the best; without early stopping, the end of the schedule
              export(tr, st, state["params"], meta)
          else:
            meta["bad_evals"] += 1
            if t.early_stop and meta["bad_evals"] >= t.patience:
              meta["stopped_early"] = True
              tqdm.write(f"early stop at step {step}: no validation gain in {t.patience} evaluations")
      pbar.set_postfix(loss=f"{m['loss']:.4f}", fvu=f"{m.get('fvu', float('nan')):.3f}",
                       tok_s=f"{m['tokens_per_s']:.0f}")
      log_f.write(dumps(m, nonfinite_as_null=True) + "\n")
      log_f.flush()
      curves.scalars(step, m)
      last = m
    if runs.itstime(step, t.ckpt_every, t.steps) or meta["stopped_early"]:
      stop_if_not_finite()
      meta["wall_s"] = time.perf_counter() - wall0
      # orbax serialises in the background: give it a snapshot of meta,
      # which this loop goes on mutating (else a checkpoint can claim a later step).
      checkpoints.save(mngr, step, state, reader.state(), json.loads(json.dumps(meta)))
    if t.stop_after and step - start >= t.stop_after:
      break  # simulates an interruption (tests): no final checkpoint
  stop_if_not_finite()
  pbar.close()
  mngr.wait_until_finished()
  log_f.close()
  curves.close()
  if (t.val_fraction <= 0 or not t.early_stop) and step >= t.steps and primary:
    export(tr, st, state["params"], meta)
  return {"step": step, "metrics": last, "best_val": meta["best_val"], "run_dir": out_dir,
          "stopped_early": meta["stopped_early"], "state": state}


def dry_run(config: ml_collections.ConfigDict, print_fn=print) -> dict:
  """Compiles this config's train step for its mesh on ``config.topology``'s devices (or the local ones)
  from abstract inputs (``sizing``); unsupervised, with both backwards."""
  shape = sizing.shape_record(config)
  return sizing.train_dry_run(config, lambda cfg, devices: setup(cfg, shape, devices), print_fn=print_fn)


def run(config: ml_collections.ConfigDict) -> dict:
  if config.get("dry_run"):
    return dry_run(config)
  if blocks.per_block(config):  # an SAE per block ({workdir}/{block}/{train.name})
    return {b: run(blocks.block_config(config, b)) for b in blocks.blocks(config)}
  result = train(config)
  m = result["metrics"]
  print(f"trained to step {result['step']}: " + ", ".join(
      f"{k} {v:.4g}" for k, v in m.items() if k in ("loss", "fvu", "l0", "dead_fraction", "val_loss",
                                                   "object_acc", "style_acc", "tokens_per_s")))
  print(f"SAE in {os.path.join(result['run_dir'], layout.EXPORT)}")
  return result


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call: the last step trained (per block with config.style_block)."""
  del judge
  if blocks.per_block(config):  # config.style_block: an SAE per block, as the CLI trains them
    return {b: train(blocks.block_config(config, b), progress=progress)["step"] for b in blocks.blocks(config)}
  return train(config, progress=progress)["step"]
