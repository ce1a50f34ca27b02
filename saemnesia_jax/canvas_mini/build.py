"""Builds CanvasMini from nothing: classifiers, base diffusion model, evaluation.

  python -m saemnesia_jax.canvas_mini.build --config configs/canvas_mini.py

1. The style / object classifiers (reused when the shipped ones load and
   match this generator; else trained, see ``classifiers.py``).
2. A small pixel-space text-to-image model built from the same diffusers /
   transformers Flax classes as Stable Diffusion (``FlaxUNet2DConditionModel``
   with cross-attention blocks, ``FlaxCLIPTextModel``, a word-level
   tokenizer), trained from scratch on generator images (epsilon MSE, AdamW,
   EMA, prompt dropout for classifier-free guidance). Resumable: an orbax
   checkpoint every ``base_train.ckpt_every`` steps; a rerun continues from the
   latest one, and a larger ``base_train.steps`` extends a finished run.
3. Evaluation on the protocol's prompts (every object x style pair and the
   anchor prompts, several seeds, the project's jitted sampler), classified by
   the classifiers; per-class accuracies and a sample grid.
4. Export as a diffusers-format directory (the EMA weights) that
   ``models.load_pipeline`` loads like any SD checkpoint, with the report and
   the config beside it.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("canvas_mini.build")

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from saemnesia_jax.canvas_mini import PIPELINE_DIR
from saemnesia_jax.canvas_mini import classifiers as clf_lib
from saemnesia_jax.canvas_mini import data
from saemnesia_jax.diffusion import models, tiny
from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec, sample_prompts
from saemnesia_jax.evaluation import images as img_utils
from saemnesia_jax.runtime import runs
from saemnesia_jax.runtime.io_utils import atomic_write_json, dumps

# ---------------------------------------------------------------- the model


def build_components(config: ml_collections.ConfigDict):
  """(unet, text_encoder, tokenizer, scheduler) of ``config.model``, random."""
  m = config.model
  unet = models.FlaxUNet2DConditionModel(
      sample_size=config.data.image_size, in_channels=3, out_channels=3,
      down_block_types=tuple(m.down_block_types), up_block_types=tuple(m.up_block_types),
      block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
      attention_head_dim=m.num_heads, cross_attention_dim=m.text_width,
      # SDXL's 'text_time' addition: the pooled text embedding is added to the
      # timestep embedding, so the prompt reaches every ResNet block.
      **(dict(addition_embed_type="text_time", addition_time_embed_dim=m.time_id_dim,
              projection_class_embeddings_input_dim=m.text_width + m.time_id_dim)
         if m.pooled_text_conditioning else {}))
  tokenizer = tiny.build_word_tokenizer(data.vocabulary(), m.max_length)
  text_config = models.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=m.text_width, intermediate_size=2 * m.text_width,
      num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
      max_position_embeddings=m.max_length, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  text_encoder = models.FlaxCLIPTextModel(text_config, seed=config.base_train.seed, _do_init=False)
  scheduler = models.FlaxDDIMScheduler(
      beta_start=m.beta_start, beta_end=m.beta_end, beta_schedule=m.beta_schedule,
      clip_sample=True, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
      prediction_type=m.prediction_type)
  return unet, text_encoder, tokenizer, scheduler


def as_pipeline(config, components, params, path: str = "<in memory>") -> models.Pipeline:
  unet, text_encoder, tokenizer, scheduler = components
  return models.Pipeline(path=path, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler=scheduler, vae=None, params=params, dtype=jnp.float32)


def init_params(components, rng) -> dict:
  unet, text_encoder, _, _ = components
  r1, r2 = jax.random.split(rng)
  return {"unet": unet.init_weights(r1), "text_encoder": text_encoder.init_weights(r2, (1, 1))}


# ----------------------------------------------------------------- training


def _cosine(peak: float, warmup: int, steps: int, final_fraction: float) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), peak * final_fraction)


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """A warm-up + cosine schedule; with ``epsilon_steps`` > 0 two of them: one
  over the epsilon phase and one (``finetune_*``) over the rest."""
  schedule = _cosine(t.learning_rate, t.warmup_steps, t.epsilon_steps or t.steps, t.final_lr_fraction)
  if 0 < t.epsilon_steps < t.steps:
    schedule = optax.join_schedules(
        [schedule, _cosine(t.finetune_learning_rate, t.finetune_warmup_steps, t.steps - t.epsilon_steps,
                           t.final_lr_fraction)], [t.epsilon_steps])
  return schedule


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(learning_rate_schedule(t), b2=0.99, weight_decay=t.weight_decay))


class Batches:
  """Fresh generator images every step: (x0 NCHW in [-1, 1], token ids), deterministic in step."""

  def __init__(self, config, tokenizer_ids: dict[tuple[int, int, int], np.ndarray], uncond: np.ndarray):
    self.config, self.ids, self.uncond = config, tokenizer_ids, uncond
    self.spec = data.RenderSpec.from_config(config.data)

  def __call__(self, step: int):
    t = self.config.base_train
    rng = np.random.default_rng([t.seed, step])
    obj = rng.integers(0, data.N_OBJECTS, t.batch_size)
    sty = rng.integers(0, data.N_STYLE_CLASSES, t.batch_size)
    variant = np.where(sty == data.NO_STYLE_ID, rng.integers(0, len(data.ANCHOR_TEMPLATES), t.batch_size), 0)
    imgs = data.render(obj, sty, rng.integers(2**31), self.spec)
    ids = np.stack([self.ids[(o, s, v)] for o, s, v in zip(obj, sty, variant)])
    drop = rng.random(t.batch_size) < t.prompt_dropout  # unconditional rows teach CFG
    ids = np.where(drop[:, None], self.uncond[None], ids)
    return (imgs.transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32), ids.astype(np.int32)


def training_target(x0, noise, alpha_bar, step, epsilon_steps: int, prediction_type: str):
  """What the UNet learns to output: the noise before ``epsilon_steps``, then
  ``prediction_type``'s target (v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0).
  ``alpha_bar`` broadcasts against x0 (one value per image)."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type != "v_prediction":
    raise ValueError(f"model.prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
  v = jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1 - alpha_bar) * x0
  return jnp.where(step >= epsilon_steps, v, noise)


def make_train_step(components, tx, ema_decay: float, epsilon_steps: int = 0):
  """The jitted step: the UNet's target is the noise (epsilon) for the first
  ``epsilon_steps`` steps and the scheduler's ``prediction_type`` after."""
  unet, text_encoder, _, scheduler = components
  sched_state = scheduler.create_state()
  alphas_cumprod = sched_state.common.alphas_cumprod
  prediction_type = scheduler.config.prediction_type

  def loss_fn(params, x0, ids, rng, step):
    r_t, r_n = jax.random.split(rng)
    t = jax.random.randint(r_t, (x0.shape[0],), 0, scheduler.config.num_train_timesteps)
    noise = jax.random.normal(r_n, x0.shape)
    xt = scheduler.add_noise(sched_state, x0, noise, t)
    cond = models.text_condition(text_encoder, params["text_encoder"], ids)
    out = models.unet_forward(unet, params["unet"], xt, t, cond).sample
    target = training_target(x0, noise, alphas_cumprod[t][:, None, None, None], step, epsilon_steps,
                             prediction_type)
    return jnp.mean((out - target) ** 2)

  @jax.jit
  def train_step(state, x0, ids):
    rng, sub = jax.random.split(state["rng"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], x0, ids, sub, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    # EMA with a warm-up so early averages are not dominated by the init; it
    # restarts with the second phase so the average holds no epsilon-era weights.
    phase_step = jnp.where(step > epsilon_steps, step - epsilon_steps, step)
    d = jnp.minimum(ema_decay, (1.0 + phase_step) / (10.0 + phase_step))
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
    return dict(params=params, opt_state=opt_state, ema=ema, step=step, rng=rng), loss

  return train_step


# --------------------------------------------------------------- evaluation


def protocol_prompts(seeds) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
  """Every object x style pair (anchor variant 0 for no style) x seeds."""
  grid = [p for p in data.prompt_grid() if p.variant == 0]
  prompts = [p.prompt for p in grid for _ in seeds]
  seed_list = [int(s) for _ in grid for s in seeds]
  obj = np.array([p.object_id for p in grid for _ in seeds])
  sty = np.array([p.style_id for p in grid for _ in seeds])
  return prompts, seed_list, obj, sty


def per_class(pred, true, names) -> dict[str, float]:
  return {n: float(np.mean(pred[true == i] == i)) for i, n in enumerate(names) if np.any(true == i)}


def evaluate_model(pipe: models.Pipeline, clfs, seeds, num_steps: int, guidance_scale: float,
                   batch_size: int, sampler: Sampler | None = None, progress: bool = False) -> dict:
  """Samples the protocol prompts and scores them with the classifiers."""
  sampler = sampler or Sampler(pipe, SamplerSpec(num_steps=num_steps, batch_size=batch_size))
  prompts, seed_list, obj, sty = protocol_prompts(seeds)
  imgs = sample_prompts(sampler, prompts, seed_list, guidance_scale, params=pipe.params, progress=progress)
  po, ps = clf_lib.predict(clfs, imgs)
  return {
      "guidance_scale": guidance_scale, "num_steps": num_steps, "seeds": list(seeds), "n": len(prompts),
      "object_accuracy": float(np.mean(po == obj)), "style_accuracy": float(np.mean(ps == sty)),
      "object_per_class": per_class(po, obj, data.OBJECTS),
      "style_per_class": per_class(ps, sty, data.STYLE_CLASSES),
      "_images": imgs, "_labels": (obj, sty),
  }


def _public(report: dict) -> dict:
  return {k: v for k, v in report.items() if not k.startswith("_")}


# -------------------------------------------------------------------- build


def _state_target(components, tx, seed: int):
  def init():
    params = init_params(components, jax.random.PRNGKey(seed))
    return dict(params=params, opt_state=tx.init(params), ema=params, step=jnp.int32(0),
                rng=jax.random.PRNGKey(seed + 1))
  return init


def train_model(config: ml_collections.ConfigDict, clfs, progress: bool = True) -> dict:
  """Trains (or resumes) the base model; returns the final train state."""
  t = config.base_train
  components = build_components(config)
  tokenizer = components[2]
  ids = {(p.object_id, p.style_id, p.variant): tokenizer(p.prompt, padding="max_length",
                                                          max_length=config.model.max_length,
                                                          truncation=True).input_ids
         for p in data.prompt_grid()}
  ids = {k: np.asarray(v, np.int32) for k, v in ids.items()}
  uncond = np.asarray(tokenizer("", padding="max_length", max_length=config.model.max_length).input_ids,
                      np.int32)
  batches = Batches(config, ids, uncond)
  tx = make_optimizer(t)
  init = _state_target(components, tx, t.seed)
  ckpt_dir = os.path.abspath(os.path.join(config.workdir, "checkpoints"))
  # The base model's identity: everything but where it goes and how often it logs.
  fp = runs.make(config, ("data", "model", "base_train"), (
      "base_train.log_every", "base_train.eval_every", "base_train.ckpt_every", "model.path",
      "model.weights", "model.dtype"), stage="canvas_mini.build")
  runs.begin(ckpt_dir, fp, overwrite=runs.overwrite(config), continuable=("base_train.steps",),
             fresh="a new --config.workdir")
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  latest = mngr.latest_step()
  if latest is not None:
    abstract = jax.eval_shape(init)
    state = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    logging.info("resumed from step %d in %s", latest, ckpt_dir)
    print(f"resuming from checkpoint step {latest}")
  else:
    state = jax.jit(init)()
  train_step = make_train_step(components, tx, t.ema_decay, t.epsilon_steps)
  log_path = os.path.join(config.workdir, "train_log.jsonl")
  start = int(state["step"])
  eval_sampler = None
  pbar = tqdm(total=t.steps, initial=start, desc="canvas_mini base model", unit="step", disable=not progress)
  t0, losses = time.perf_counter(), []
  for step in range(start, t.steps):
    x0, tok = batches(step)
    state, loss = train_step(state, x0, tok)
    losses.append(loss)
    done = step + 1
    if runs.itstime(done, t.log_every, t.steps):
      mean_loss = float(jnp.mean(jnp.stack(losses)))
      losses = []
      rate = (done - start) * t.batch_size / (time.perf_counter() - t0)
      pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
      rec = {"step": done, "loss": mean_loss, "images_per_s": rate, "time": time.time()}
      if runs.itstime(done, t.eval_every, t.steps):
        pipe = as_pipeline(config, components, state["ema"])
        if eval_sampler is None:
          eval_sampler = Sampler(pipe, SamplerSpec(num_steps=config.base_eval.num_steps,
                                                    batch_size=config.base_eval.batch_size))
        r = evaluate_model(pipe, clfs, config.base_eval.train_seeds, config.base_eval.num_steps,
                           config.sampler.guidance_scale, config.base_eval.batch_size, sampler=eval_sampler)
        rec.update(object_accuracy=r["object_accuracy"], style_accuracy=r["style_accuracy"])
        tqdm.write(f"step {done}: loss {mean_loss:.4f}  object acc {r['object_accuracy']:.3f}  "
                   f"style acc {r['style_accuracy']:.3f}")
      with open(log_path, "a") as f:
        f.write(dumps(rec, nonfinite_as_null=True) + "\n")
    if runs.itstime(done, t.ckpt_every, t.steps):
      mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    pbar.update(1)
  pbar.close()
  mngr.wait_until_finished()
  return state, components


def export(config, components, params, out_dir: str, report: dict) -> str:
  unet, text_encoder, tokenizer, scheduler = components
  tiny.save_pipeline(out_dir, unet, params["unet"], text_encoder, params["text_encoder"],
                       tokenizer, scheduler)
  atomic_write_json(os.path.join(out_dir, "canvas_mini.json"), report)
  return out_dir


def run(config: ml_collections.ConfigDict) -> dict:
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  os.makedirs(config.workdir, exist_ok=True)
  try:
    clfs = clf_lib.load_classifiers()
    print("using the shipped classifiers")
  except (FileNotFoundError, ValueError) as e:
    print(f"training the classifiers ({e})")
    clf_lib.train_and_save(config, clf_lib.default_path())
    clfs = clf_lib.load_classifiers()
  t0 = time.perf_counter()
  state, components = train_model(config, clfs)
  train_s = time.perf_counter() - t0
  params = jax.device_get(state["ema"])
  pipe = as_pipeline(config, components, params)
  sampler = Sampler(pipe, SamplerSpec(num_steps=config.base_eval.num_steps, batch_size=config.base_eval.batch_size))
  evals = [evaluate_model(pipe, clfs, config.base_eval.seeds, config.base_eval.num_steps, g,
                          config.base_eval.batch_size, sampler=sampler, progress=True)
           for g in config.base_eval.guidance_scales]
  for r in evals:
    print(f"CFG {r['guidance_scale']}: object {100 * r['object_accuracy']:.1f}%  "
          f"style {100 * r['style_accuracy']:.1f}%  (n={r['n']})")
  best = max(evals, key=lambda r: r["object_accuracy"] + r["style_accuracy"])
  report = {
      "config": config.to_dict(), "train_seconds": train_s, "steps": int(state["step"]),
      "evaluations": [_public(r) for r in evals], "chosen_guidance_scale": best["guidance_scale"],
      "bar": {"object": 0.90, "style": 0.85, "per_class": 0.75},
  }
  out_dir = os.path.abspath(config.build.export_dir or PIPELINE_DIR)
  export(config, components, params, out_dir, report)
  # One sample per (style class, object) pair at the chosen scale: rows styles, columns objects.
  obj, sty = best["_labels"]
  n_seeds = len(config.base_eval.seeds)
  first = best["_images"][::n_seeds]  # object-major grid of (object, style) pairs
  order = np.argsort(sty[::n_seeds] * data.N_OBJECTS + obj[::n_seeds], kind="stable")
  g = img_utils.grid(first[order], data.N_STYLE_CLASSES, data.N_OBJECTS, scale=3,
                     row_labels=list(data.STYLE_CLASSES), col_labels=list(data.OBJECTS), label_width=70)
  img_utils.save_image(os.path.join(out_dir, "samples_grid.png"), g)
  print(f"wrote {out_dir}")
  return report

