"""Unlearning: the latent clamp (docs/method.md section 5) as a pure function.

At every sampling step and for both CFG halves, at the hooked block:

1. ``z = TopK(encode(x))`` per token;
2. for each selected latent i, at the tokens where ``z_i`` exceeds the
   threshold of that step (the mean over all concepts of mu_c(i, t)):
   ``z_i <- gamma * mu_target(i, t) * z_i`` (gamma negative);
3. the block outputs ``x + decode(z_edit) - decode(z)``, so the SAE's
   reconstruction error is kept and an empty clamp changes nothing
   (``kept_error='x_minus_xhat'``, the project's). ``kept_error='xhat_minus_x'``
   is the released hooks' ``decode(z_edit) + (x_hat - x)``: with an empty
   clamp the block outputs ``2 x_hat - x`` (docs/method.md, the protocol table).

Since only the selected latents change, ``decode(z_edit) - decode(z)`` is
``(z_edit - z)[:, sel] @ W_dec[sel]``: one small matmul after the encoder.

A ``ClampSpec`` is a pytree of arrays with a fixed number ``M`` of entries
(padding entries are inactive), passed to the jitted sampler as the edit's
parameters: a sweep over gamma, over concepts or over selections reuses one
compiled sampler. Entry m is latent ``latents[m]``, active at sampler step s
when ``active[s, m]``, with multiplier ``multiplier[s, m] = gamma *
mu_target(i, t)`` (gamma is unitless; mu_target and the threshold
``threshold[s, m]`` are in the SAE's activation units, so the multiplier is
too). Several concepts erased at once (sequential unlearning) edit the union
of their latents, each latent once: where several concepts select the same
latent at a step, the most negative of their multipliers applies (the
strongest erasure among them), not the sum of their edits, at the lowest of
their thresholds.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saemnesia_jax.evaluation.variants import SCALES, THRESHOLDS
from saemnesia_jax.sae import model as sae_lib


class ClampSpec(NamedTuple):
  latents: jax.Array  # (M,) int32 latent ids, each at most once
  active: jax.Array  # (n_steps, M) bool: entry m applies at sampler step s
  multiplier: jax.Array  # (n_steps, M) float32: gamma * mu_target(i, t)
  threshold: jax.Array  # (n_steps, M) float32


def empty_spec(n_steps: int, m: int) -> ClampSpec:
  """A spec with M inactive entries: the identity edit."""
  return ClampSpec(np.zeros(m, np.int32), np.zeros((n_steps, m), bool), np.zeros((n_steps, m), np.float32),
                   np.zeros((n_steps, m), np.float32))


KEPT_ERRORS = ("x_minus_xhat", "xhat_minus_x")  # project | released (evaluation/protocol.py)


def clamp(sae_params: dict, spec: ClampSpec, x: jax.Array, step: jax.Array, k: int,
          kept_error: str = "x_minus_xhat", sae_dtype: str = "float32") -> jax.Array:
  """The clamped block output for ``x`` (..., d_in) at sampler step ``step``.

  ``sae_dtype``: the precision of the SAE's encode and decode (the released
  hooks run a float16 SAE and keep the error in float32).
  """
  if kept_error not in KEPT_ERRORS:
    raise ValueError(f"kept_error={kept_error!r}; known: {KEPT_ERRORS}")
  shape, dtype = x.shape, x.dtype
  tokens = x.reshape(-1, shape[-1]).astype(jnp.float32)
  if sae_dtype != "float32":
    sae_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(sae_dtype), sae_params)
  values, indices = sae_lib.topk(sae_lib.encode_pre(sae_params, tokens.astype(sae_dtype)), k)  # (N, k)
  if kept_error == "xhat_minus_x":
    # decode(z_edit) + (x_hat - x) = x_hat + (z_edit - z) W_dec + (x_hat - x).
    x_hat = sae_lib.decode_sparse(sae_params, values, indices)
    values = values.astype(jnp.float32)
    base = x_hat.astype(jnp.float32) + (x_hat - tokens.astype(sae_dtype)).astype(jnp.float32)
  else:
    values = values.astype(jnp.float32)
    base = tokens
  # z at the selected latents (0 where a latent is not among a token's top k).
  hit = indices[:, :, None] == spec.latents[None, None, :]  # (N, k, M)
  z_sel = jnp.einsum("nk,nkm->nm", values, hit.astype(values.dtype))
  on = spec.active[step][None] & (z_sel > spec.threshold[step][None])
  delta = jnp.where(on, (spec.multiplier[step][None] - 1.0) * z_sel, 0.0)  # z_edit - z
  w = jnp.take(sae_params["W_dec"], spec.latents, axis=0).astype(jnp.float32)  # (M, d_in)
  return (base + delta @ w).reshape(shape).astype(dtype)


def make_edit_fn(k: int, kept_error: str = "x_minus_xhat", sae_dtype: str = "float32"):
  """``edit_fn(edit_params, x, step)`` for the sampler; edit_params = (sae_params, spec)."""

  def edit_fn(edit_params, x, step):
    sae_params, spec = edit_params
    return clamp(sae_params, spec, x, step, k, kept_error, sae_dtype)
  return edit_fn


# --------------------------------------------------------------- building specs


def step_map(sampler_timesteps: Sequence[int], score_timesteps: Sequence[int]) -> np.ndarray:
  """For each sampler step, the index of the scored step with the nearest timestep.

  Scores are collected at one schedule (e.g. 50 steps) and evaluation may
  sample at another (e.g. 100): each step uses the statistics of the
  nearest collected timestep.
  """
  a = np.asarray(sampler_timesteps)[:, None].astype(np.int64)
  b = np.asarray(score_timesteps)[None, :].astype(np.int64)
  return np.argmin(np.abs(a - b), axis=1)


class Entry(NamedTuple):
  """One concept's contribution to a clamp."""
  latents: np.ndarray  # (m,) latent ids
  active: np.ndarray  # (n_score_steps, m) bool
  mu: np.ndarray  # (n_score_steps, L) mu_target of the concept (all latents)
  threshold: np.ndarray  # (n_score_steps, L)
  gamma: float


def concept_entry(mu_c: np.ndarray, threshold: np.ndarray, gamma: float, *,
                  assigned: int | None = None, scores_c: np.ndarray | None = None,
                  percentile: float | None = None) -> Entry:
  """One concept's clamp entry.

  SAEmnesia: ``assigned`` latent at every step. SAeUron: the latents whose
  importance score (``scores_c``, (n_steps, L)) is above the ``percentile``-th
  percentile of that step's scores (per timestep, as SAeUron selects).
  """
  n_steps, L = mu_c.shape
  if assigned is not None:
    return Entry(np.array([assigned], np.int32), np.ones((n_steps, 1), bool), mu_c, threshold, gamma)
  if scores_c is None or percentile is None:
    raise ValueError("concept_entry needs either assigned= (SAEmnesia) or scores_c= and percentile= (SAeUron)")
  cut = np.percentile(scores_c, percentile, axis=1, keepdims=True)
  sel = scores_c > cut  # (n_steps, L)
  latents = np.flatnonzero(sel.any(0)).astype(np.int32)
  return Entry(latents, sel[:, latents], mu_c, threshold, gamma)


def with_rules(e: Entry, scale: str = "mu", threshold: str = "mean", steps: float = 1.0,
               start: float = 0.0) -> Entry:
  """``e`` under other clamp rules.

  ``scale='self'``: ``z_i <- gamma * z_i`` (gamma unitless, relative to the
  latent's own value: -1 flips it, 0 removes it) instead of gamma *
  mu_target(i, t) * z_i, whose push grows with the concept's mean activation.
  ``threshold='zero'``: edit every token where the latent is active;
  ``threshold='target'``: only where it exceeds mu_target(i, t), the erased
  concept's own mean activation (the papers': the mean over all concepts).
  ``steps``: the share of the trajectory, from the noisiest step, in which the
  clamp acts (1.0: every step; 0.5: the first half, where layout is decided).
  ``start``: the share of the trajectory that passes before the clamp acts
  (0.5: only the second half, where detail and texture are drawn).
  """
  if scale not in SCALES:
    raise ValueError(f"clamp scale {scale!r}; known: {SCALES}")
  if threshold not in THRESHOLDS:
    raise ValueError(f"clamp threshold {threshold!r}; known: {THRESHOLDS}")
  if not 0.0 < steps <= 1.0:
    raise ValueError(f"clamp steps={steps}: the share of the sampling steps with the clamp on, in (0, 1]")
  if not 0.0 <= start < 1.0:
    raise ValueError(f"clamp start={start}: the share of the sampling steps before the clamp acts, in [0, 1)")
  mu = np.ones_like(e.mu) if scale == "self" else e.mu
  thr = {"zero": np.zeros_like(e.threshold), "target": e.mu}.get(threshold, e.threshold)
  active = e.active.copy()
  active[int(np.ceil(steps * len(active))):] = False  # score steps run from the noisiest (index 0)
  active[:int(np.floor(start * len(active)))] = False
  return Entry(e.latents, active, mu, thr, e.gamma)


def build_spec(entries: Sequence[Entry], sampler_timesteps: Sequence[int], score_timesteps: Sequence[int],
               max_latents: int) -> ClampSpec:
  """The union of ``entries`` as a ClampSpec of ``max_latents`` entries, per sampler step.

  A latent selected by several entries gets one spec entry: active where any
  of them is, with the most negative of their multipliers and the lowest of
  their thresholds at each step.
  """
  smap = step_map(sampler_timesteps, score_timesteps)
  n = len(smap)
  latents = sorted({int(i) for e in entries for i in e.latents}, key=[int(i) for e in entries
                                                                       for i in e.latents].index)
  m = len(latents)
  if m > max_latents:
    raise ValueError(f"the clamp selects {m} latents but the spec holds max_latents={max_latents}: "
                     "raise config.evaluate.max_latents (one compile per size) or select fewer")
  spec = empty_spec(n, max_latents)
  act = np.zeros((n, m), bool)
  mult = np.full((n, m), np.inf, np.float32)
  thr = np.full((n, m), np.inf, np.float32)
  col = {lat: j for j, lat in enumerate(latents)}
  for e in entries:
    js = np.array([col[int(i)] for i in e.latents], np.int64)
    on = e.active[smap]  # (n, len(e.latents))
    mu = e.mu[smap][:, e.latents] * np.float32(e.gamma)
    act[:, js] |= on
    mult[:, js] = np.where(on, np.minimum(mult[:, js], mu), mult[:, js])
    # The papers' threshold is the same for every concept; with per-concept
    # ones (threshold='target') a token is edited where any of them fires.
    thr[:, js] = np.where(on, np.minimum(thr[:, js], e.threshold[smap][:, e.latents]), thr[:, js])
  mult[~act] = 0.0
  thr[~act] = 0.0
  if m:
    spec = ClampSpec(
        np.concatenate([np.asarray(latents, np.int32), spec.latents[m:]]),
        np.concatenate([act, spec.active[:, m:]], 1),
        np.concatenate([mult, spec.multiplier[:, m:]], 1).astype(np.float32),
        np.concatenate([thr, spec.threshold[:, m:]], 1).astype(np.float32))
  return spec
