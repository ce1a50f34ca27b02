"""SAeUron's importance scores and feature selection (docs/method.md section 4).

Inputs are per-map latent means: for each collected map (one prompt at one
sampling step), the TopK codes averaged over its T tokens, (n_maps, n_latents),
with the map's concept id and timestep index.  Shapes below:
C = n_concepts, S = n_steps, L = n_latents.

- ``concept_sums`` / ``concept_means``: mu_c(i, t) (C, S, L), the mean over a
  concept's prompts at step t, and the prompt counts (C, S).  Sums add across
  batches, so a large collection is reduced batch by batch.
- ``importance_scores``: s(i, t, c) = mu_c / sum_j mu_c - mu_notc / sum_j mu_notc,
  eps 1e-8 in the denominators.  mu_notc pools the *prompts* of every other
  concept (count-weighted mean, as the released code concatenates the other
  concepts' prompts before averaging), not the mean of their means.
- ``percentile_selection``: per concept and per timestep, the latents whose
  score is strictly above the p-th percentile (linear interpolation) of that
  (concept, timestep)'s L scores.  This is what SAeUron's released unlearning
  hook does: it computes a threshold for every timestep from that timestep's
  scores and clamps a per-timestep latent set; nothing is pooled over time.
  With L = 20,480 distinct scores this keeps 3 / 2 / 1 latents per step at
  p = 99.99 / 99.995 / 99.999.
- ``clamp_threshold``: the unweighted mean over all concepts of mu_c(i, t)
  (S, L), the activation above which the clamp edits a token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def concept_sums(codes_map_mean: jax.Array, concept_ids: jax.Array, step_ids: jax.Array,
                 n_concepts: int, n_steps: int) -> tuple[jax.Array, jax.Array]:
  """Per (concept, step) sums of map-mean codes and prompt counts.

  Args:
    codes_map_mean: (n_maps, L) TopK codes averaged over each map's tokens.
    concept_ids, step_ids: (n_maps,) int; maps with an id outside
      [0, n_concepts) or [0, n_steps) are ignored.
    n_concepts, n_steps: static.
  Returns: sums (C, S, L) float32 and counts (C, S) float32.
  """
  valid = (concept_ids >= 0) & (concept_ids < n_concepts) & (step_ids >= 0) & (step_ids < n_steps)
  # Invalid rows go to an out-of-range segment, which segment_sum drops.
  seg = jnp.where(valid, concept_ids * n_steps + step_ids, n_concepts * n_steps)
  n_seg = n_concepts * n_steps
  codes = codes_map_mean.astype(jnp.float32)
  sums = jax.ops.segment_sum(codes, seg, num_segments=n_seg)
  counts = jax.ops.segment_sum(jnp.ones(seg.shape, jnp.float32), seg, num_segments=n_seg)
  return sums.reshape(n_concepts, n_steps, -1), counts.reshape(n_concepts, n_steps)


def concept_means(codes_map_mean: jax.Array, concept_ids: jax.Array, step_ids: jax.Array,
                  n_concepts: int, n_steps: int) -> tuple[jax.Array, jax.Array]:
  """mu (C, S, L): mean map-mean code per concept and step (0 where a cell has no map),
  and the counts (C, S) that ``importance_scores`` needs for pooling."""
  sums, counts = concept_sums(codes_map_mean, concept_ids, step_ids, n_concepts, n_steps)
  return sums / jnp.maximum(counts, 1.0)[..., None], counts


def importance_scores(mu: jax.Array, counts: jax.Array, eps: float = 1e-8) -> jax.Array:
  """s (C, S, L): SAeUron's importance score of each latent for each concept and step.

  mu_notc(t) = sum_{c' != c} n_{c't} mu_{c'}(t) / sum_{c' != c} n_{c't}, i.e.
  the mean over all prompts of the other concepts (0 if there are none).
  """
  counts = counts.astype(mu.dtype)
  weighted = counts[..., None] * mu
  total = jnp.sum(weighted, axis=0, keepdims=True)  # (1, S, L)
  total_n = jnp.sum(counts, axis=0, keepdims=True)  # (1, S)
  other_n = (total_n - counts)[..., None]
  mu_notc = jnp.where(other_n > 0, (total - weighted) / jnp.maximum(other_n, 1.0), 0.0)
  p_c = mu / (jnp.sum(mu, axis=-1, keepdims=True) + eps)
  p_notc = mu_notc / (jnp.sum(mu_notc, axis=-1, keepdims=True) + eps)
  return p_c - p_notc


def percentile_selection(s: jax.Array, p: float) -> jax.Array:
  """(C, S, L) bool: latents with score strictly above the p-th percentile (p in [0, 100])
  of their own (concept, step) scores (linear interpolation, as torch.quantile)."""
  threshold = jnp.quantile(s, p / 100.0, axis=-1, keepdims=True)
  return s > threshold


def assigned_selection(assignment: jax.Array, n_steps: int, n_latents: int) -> jax.Array:
  """(C, S, L) bool: SAEmnesia's selection, each concept's assigned latent at every step."""
  one = jax.nn.one_hot(assignment, n_latents, dtype=jnp.bool_)  # (C, L)
  return jnp.broadcast_to(one[:, None, :], (assignment.shape[0], n_steps, n_latents))


def clamp_threshold(mu: jax.Array) -> jax.Array:
  """(S, L): the mean over all concepts of mu_c(i, t), the clamp's firing threshold."""
  return jnp.mean(mu, axis=0)


def association_report(scores: jax.Array, mass_fraction: float = 0.9) -> dict[str, jax.Array]:
  """How concentrated each concept's positive importance mass is.

  Args:
    scores: (C, L) or (C, S, L); the latter is averaged over steps first.
    mass_fraction: the share of mass to reach (0.9 in issue 5).
  Returns, per concept (each (C,)):
    best_latent: argmax of the positive part of the score;
    top1_share: its share of the positive score mass;
    n_latents_to_mass: fewest latents (taken in decreasing score) whose
      positive scores sum to >= mass_fraction of the mass.
    A concept with no positive score has top1_share 0 and n_latents_to_mass 0.
  """
  if scores.ndim == 3:
    scores = jnp.mean(scores, axis=1)
  pos = jnp.maximum(scores, 0.0)
  mass = jnp.sum(pos, axis=-1)
  has_mass = mass > 0
  sorted_pos = -jnp.sort(-pos, axis=-1)
  cum = jnp.cumsum(sorted_pos, axis=-1)
  # Small relative slack so float rounding in the cumsum does not add a latent.
  reached = cum >= mass_fraction * mass[:, None] * (1.0 - 1e-6)
  n_needed = jnp.argmax(reached, axis=-1) + 1
  return {
      "best_latent": jnp.argmax(pos, axis=-1).astype(jnp.int32),
      "top1_share": jnp.where(has_mass, sorted_pos[:, 0] / jnp.where(has_mass, mass, 1.0), 0.0),
      "n_latents_to_mass": jnp.where(has_mass, n_needed, 0).astype(jnp.int32),
  }
