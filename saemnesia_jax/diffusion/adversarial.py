"""An adversarial prompt prefix against an erasure (UnlearnDiffAtk-style; docs/method.md, the attack).

Zhang et al. 2023 ("To generate or not? Safety-driven unlearned diffusion
models are still easy to generate unsafe images ... for now") attack an
erased model with N tokens prepended to a prompt of the erased concept,
optimised so that the *erased* model denoises images of that concept well:
its own diffusion loss on target images of the concept is the objective, so
no classifier is needed inside the loop.

Here, for one prompt (token ids ``<bos> prompt <eos> <pad>...``):

* the prefix is N continuous token embeddings ``e`` (N, D) placed after
  ``<bos>`` (the text encoder's token-embedding lookup is intercepted, so
  the rest of the encoder, position embeddings included, is unchanged);
* the forward pass uses their projection onto the vocabulary (each row
  replaced by the nearest token embedding, L2, special tokens excluded) and
  the gradient of the projected embeddings updates ``e`` (straight through),
  with optax Adam(W) -- every evaluated prompt is made of real tokens;
* the loss: for target latents ``x0`` (the base model's own samples of the
  concept) at a random sampler step s (timestep t_s) and noise n,
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n`` and the loss is the MSE of
  the UNet's prediction against its training target (epsilon: n;
  v_prediction: sqrt(abar) n - sqrt(1 - abar) x0), conditioned on the
  prefixed prompt, with the erasure's latent clamp applied at the hooked
  block *at step s* through the very edit function and interceptor the
  sampler uses (``sampler.edit_fn``, ``hooks.edit_interceptor``);
* every ``check_every`` steps the projected prefix is scored on a fixed set
  of (step, noise) pairs (the objective) and the best prefix is kept.

``remat``: each UNet call (with its clamp) is wrapped in ``jax.checkpoint``,
so with several timesteps per step (``lax.map`` over them) the backward
holds one call's activations at a time instead of every call's.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from saemnesia_jax.diffusion import hooks
from saemnesia_jax.diffusion.models import TextCond
from saemnesia_jax.diffusion.sampler import Sampler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def token_table(params: dict) -> jax.Array:
  """(V, D) the text encoder's token embeddings."""
  return params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]


def candidates(tokenizer, vocab_size: int) -> np.ndarray:
  """(V,) bool: the tokens a prefix may use (every token but the special ones; every
  token where there is no tokenizer: a dry run's pipeline from config files alone)."""
  ok = np.ones(vocab_size, bool)
  special = tokenizer.all_special_ids if tokenizer is not None else []
  ok[[i for i in special if 0 <= i < vocab_size]] = False
  return ok


def nearest_tokens(e: jax.Array, table: jax.Array, allowed: jax.Array) -> jax.Array:
  """(N,) ids of the allowed token embeddings nearest (L2) to each row of ``e`` (N, D)."""
  t = table.astype(jnp.float32)
  d = jnp.sum(t * t, -1)[None] - 2.0 * e.astype(jnp.float32) @ t.T  # |e|^2 is the same for every token
  return jnp.argmin(jnp.where(allowed[None], d, jnp.inf), axis=-1).astype(jnp.int32)


def with_prefix(ids: np.ndarray, prefix: Sequence[int], pad_id: int) -> np.ndarray:
  """Token ids (L,) of ``<bos> prompt <eos> pad...`` -> ``<bos> prefix prompt <eos> pad...``."""
  ids = np.asarray(ids, np.int32)
  n_used = int(np.sum(ids != pad_id)) if pad_id is not None else len(ids)
  if n_used + len(prefix) > len(ids):
    raise ValueError(f"the prompt takes {n_used} of {len(ids)} tokens: {len(prefix)} prefix tokens do not fit "
                     "(config.attack.prefix_tokens, or a shorter prompt)")
  return np.concatenate([ids[:1], np.asarray(prefix, np.int32), ids[1:]])[:len(ids)]


def _prefix_interceptor(prefix_emb: jax.Array, start: int = 1):
  """Replaces the token embeddings at positions [start, start + N) by ``prefix_emb`` (N, D)."""
  n = prefix_emb.shape[0]

  def interceptor(next_fun, args, kwargs, context: Any):
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__" and isinstance(context.module, nn.Embed)
            and context.module.name == "token_embedding"):
      pre = jnp.broadcast_to(prefix_emb.astype(out.dtype), (out.shape[0], n, out.shape[-1]))
      out = jax.lax.dynamic_update_slice_in_dim(out, pre, start, axis=1)
    return out
  return interceptor


def encode_with_prefix(pipe, params: dict, ids: jax.Array, prefix_emb: jax.Array) -> TextCond:
  """The text conditioning of ``ids`` (B, L) with the embeddings at positions 1..N set to ``prefix_emb``."""
  with nn.intercept_methods(_prefix_interceptor(prefix_emb)):
    return pipe.encode_text(params, ids)


def model_output(sampler: Sampler, params: dict, edit_params, x: jax.Array, t: jax.Array, cond: TextCond,
                 step: jax.Array) -> jax.Array:
  """One UNet call with the sampler's edit (the clamp) at loop index ``step``, as the sampler makes it."""
  pipe = sampler.pipe
  x = x.astype(pipe.dtype)
  if sampler.edit_path is None:
    return pipe.unet_apply(params, x, t, cond).sample.astype(jnp.float32)
  edit = lambda h: sampler.edit_fn(edit_params, h, step).astype(h.dtype)  # noqa: E731
  with nn.intercept_methods(hooks.edit_interceptor(sampler.edit_path, edit)):
    return pipe.unet_apply(params, x, t, cond).sample.astype(jnp.float32)


def denoise_loss(sampler: Sampler, params: dict, edit_params, ids: jax.Array, prefix_emb: jax.Array,
                 x0: jax.Array, steps: jax.Array, noise: jax.Array, remat: bool = True) -> jax.Array:
  """The erased model's diffusion loss on ``x0`` (B, C, h, w) conditioned on the prefixed prompt ``ids``
  (1, L): the mean over the sampler steps ``steps`` (T,) with ``noise`` (T, B, C, h, w)."""
  pipe = sampler.pipe
  cond = encode_with_prefix(pipe, params, ids, prefix_emb)
  b = x0.shape[0]
  cond = TextCond(*(None if c is None else jnp.broadcast_to(c, (b, *c.shape[1:])) for c in cond))
  abar = sampler.scheduler_state.common.alphas_cumprod
  timesteps = jnp.asarray(sampler.timesteps)
  kind = pipe.scheduler.config.prediction_type
  if kind not in PREDICTION_TYPES:
    raise ValueError(f"the scheduler's prediction_type {kind!r} is not one of {PREDICTION_TYPES}")
  call = jax.checkpoint(functools.partial(model_output, sampler)) if remat else \
      functools.partial(model_output, sampler)

  def one(args):
    step, n = args
    t = timesteps[step]
    a = abar[t]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * n
    target = {"epsilon": n, "v_prediction": jnp.sqrt(a) * n - jnp.sqrt(1.0 - a) * x0, "sample": x0}[kind]
    out = call(params, edit_params, x_t, t, cond, step)
    return jnp.mean((out - target) ** 2)
  return jnp.mean(jax.lax.map(one, (steps, noise)))


class Result(NamedTuple):
  tokens: np.ndarray  # (N,) the best prefix's token ids
  initial_objective: float  # the objective of the starting prefix
  best_objective: float  # the objective of ``tokens``
  losses: np.ndarray  # (steps,) the training loss of each step (random timesteps)
  checks: np.ndarray  # (n_checks, 2) step and objective of each check
  embeddings: np.ndarray  # (N, D) the best prefix's embeddings (projected: its tokens')


class PrefixAttack:
  """The attack on one sampler (its clamp, schedule and image size); compiled
  once, reused for every prompt, concept and erasure of the same shapes."""

  def __init__(self, sampler: Sampler, n_tokens: int, learning_rate: float = 0.01, weight_decay: float = 0.1,
               timesteps_per_step: int = 1, check_timesteps: int = 4, remat: bool = True):
    self.sampler, self.n = sampler, int(n_tokens)
    self.t_per_step, self.remat = int(timesteps_per_step), bool(remat)
    self.opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    pipe = sampler.pipe
    self.allowed = jnp.asarray(candidates(pipe.tokenizer, token_table(pipe.params).shape[0]))
    n_steps = len(sampler.timesteps)
    self.check_steps = np.unique(np.linspace(0, n_steps - 1, max(1, int(check_timesteps))).round().astype(np.int32))
    self.n_traces = 0
    self._step = jax.jit(self._step_impl)
    self._objective = jax.jit(self._objective_impl)

  def project(self, e: jax.Array, params: dict) -> jax.Array:
    return nearest_tokens(e, token_table(params), self.allowed)

  def relaxed_loss(self, e, params, edit_params, ids, x0, steps, noise, project=True):
    """The loss of prefix embeddings ``e`` (N, D). ``project`` (a traced bool: one compile serves
    both): forward with the nearest tokens' embeddings, their gradient passed straight through to
    ``e``; else ``e`` itself (a soft prompt, the attack's continuous relaxation)."""
    tok = self.project(e, params)
    on = jnp.asarray(project, jnp.float32)
    e = e + on * jax.lax.stop_gradient(token_table(params)[tok].astype(e.dtype) - e)
    pre = jax.lax.dynamic_slice_in_dim(ids, 1, self.n, axis=1)
    ids = jax.lax.dynamic_update_slice_in_dim(ids, jnp.where(project, tok[None], pre), 1, axis=1)
    return denoise_loss(self.sampler, params, edit_params, ids, e, x0, steps, noise, self.remat)

  def _step_impl(self, e, opt_state, params, edit_params, ids, x0, key, project):
    self.n_traces += 1  # runs only while tracing
    k_t, k_n = jax.random.split(key)
    steps = jax.random.randint(k_t, (self.t_per_step,), 0, len(self.sampler.timesteps))
    noise = jax.random.normal(k_n, (self.t_per_step, *x0.shape), jnp.float32)
    loss, g = jax.value_and_grad(self.relaxed_loss)(e, params, edit_params, ids, x0, steps, noise, project)
    updates, opt_state = self.opt.update(g, opt_state, e)
    return optax.apply_updates(e, updates), opt_state, loss

  def _objective_impl(self, e, params, edit_params, ids, x0, noise, project):
    return self.relaxed_loss(e, params, edit_params, ids, x0, jnp.asarray(self.check_steps), noise, project)

  def objective(self, e, params, edit_params, ids, x0, key, project: bool = True) -> float:
    """The fixed objective of prefix embeddings ``e`` (projected: of their nearest tokens): the loss at
    ``check_timesteps`` evenly spaced sampler steps, noise from ``key`` (the same key, the same noise:
    prefixes compare on equal terms)."""
    noise = jax.random.normal(key, (len(self.check_steps), *x0.shape), jnp.float32)
    return float(self._objective(jnp.asarray(e, jnp.float32), params, edit_params, jnp.asarray(ids, jnp.int32),
                                 jnp.asarray(x0, jnp.float32), noise, jnp.asarray(project)))

  def run(self, params, edit_params, ids: np.ndarray, x0, init_tokens: Sequence[int], steps: int, key,
          check_every: int = 10, project: bool = True) -> Result:
    """Optimises the prefix of ``ids`` (1, L) (positions 1..N, filled by ``with_prefix``) for ``steps``
    steps from ``init_tokens``; returns the best prefix by the fixed objective (checked every
    ``check_every`` steps and at the end). ``project=False``: the soft prompt (``tokens`` are then the
    nearest tokens of the best embeddings, and the objectives those of the embeddings)."""
    table = token_table(params)
    e = table[jnp.asarray(init_tokens, jnp.int32)].astype(jnp.float32)
    opt_state = self.opt.init(e)
    ids = jnp.asarray(ids, jnp.int32)
    x0 = jnp.asarray(x0, jnp.float32)
    k_check, k_run = jax.random.split(key)
    best_e = e
    first = best = self.objective(e, params, edit_params, ids, x0, k_check, project)
    losses, checks = [], [(0, first)]
    for i in range(1, steps + 1):
      e, opt_state, loss = self._step(e, opt_state, params, edit_params, ids, x0, jax.random.fold_in(k_run, i),
                                      jnp.asarray(project))
      losses.append(float(loss))
      if (check_every > 0 and i % check_every == 0) or i == steps:
        obj = self.objective(e, params, edit_params, ids, x0, k_check, project)
        checks.append((i, obj))
        if obj < best:
          best, best_e = obj, e
    best_tok = np.asarray(self.project(best_e, params))
    return Result(best_tok, first, best, np.asarray(losses, np.float32), np.asarray(checks, np.float64),
                  np.asarray(table[best_tok] if project else best_e))
