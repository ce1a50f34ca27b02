"""SAEmnesia's supervised objective (docs/method.md section 3).

Each concept (object or style) owns one designated latent.  The *assignment*
is an int array of latent ids laid out objects first, then styles::

  assignment[:n_objects]   latent of object 0 .. n_objects-1
  assignment[n_objects:]   latent of style  0 .. n_styles-1

A batch is a set of maps: ``x_maps`` (B, T, d_in), T tokens (spatial
positions) per map, with one object id per map and one style id per map (-1
for a map with no style, UnlearnCanvas' "Seed_Images").

Loss (published)::

  L = MSE(x, x_hat) + w_sup * L_sup + w_l1 * mean|z| + w_decorr * mean_{o,s} corr(o, s)^2

where x_hat is the SAE reconstruction from the (per-token, or BatchTopK)
TopK codes; z is the post-ReLU *pre*-TopK latent array (B, T, n_latents);
z_bar = mean over a map's T tokens of z; L_sup works on z_bar[A] (A the
assigned latents) used directly as logits; corr is the Pearson correlation
across the B maps of z_bar between each object latent and each style latent.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saemnesia_jax.sae import model as sae_lib

Params = sae_lib.Params


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
  """Static settings of the supervised loss (hashable: usable as a jit static arg).

  Attributes:
    n_objects: how many leading entries of the assignment are objects.
    k: TopK of the reconstruction path.
    batch_topk: reconstruct with BatchTopK over all B*T tokens instead of
      per-token TopK.
    sparse_decode: decode per-token TopK codes by gathering W_dec rows.
    w_sup, w_l1, w_decorr: weights of L_sup, mean|z| and the decorrelation
      term (3.0 / 0.01 / 0.1 published).
    sup_loss: 'bce' (sigmoid BCE over all assigned latents, the released
      code; default) or 'softmax' (softmax cross-entropy within each domain).
      Both are always computed and reported; this picks the one optimised.
    eps: floor of the standard deviations in the Pearson correlation.
    selection: BatchTopK's cut, as ``model.SaeConfig.selection``: "exact",
      "threshold" (from each token's top 4k values) or "auto" (threshold on TPU).
  """
  n_objects: int
  k: int = 32
  batch_topk: bool = False
  sparse_decode: bool = False
  w_sup: float = 3.0
  w_l1: float = 0.01
  w_decorr: float = 0.1
  sup_loss: str = "bce"
  eps: float = 1e-8
  selection: str = "exact"

  def __post_init__(self):
    if self.sup_loss not in ("bce", "softmax"):
      raise ValueError(f"SupervisedConfig.sup_loss must be 'bce' or 'softmax', got {self.sup_loss!r}.")
    if self.n_objects < 1:
      raise ValueError(f"SupervisedConfig.n_objects must be >= 1, got {self.n_objects}.")
    if self.sparse_decode and self.batch_topk:
      raise ValueError("SupervisedConfig: sparse_decode=True needs per-token TopK (batch_topk=False).")


# ---------------------------------------------------------------------------
# Concept -> latent assignment


def random_assignment(rng: jax.Array, n_objects: int, n_styles: int, n_latents: int) -> jax.Array:
  """Distinct random latents for n_objects + n_styles concepts (objects first), int32."""
  n = n_objects + n_styles
  if n > n_latents:
    raise ValueError(f"random_assignment: {n} concepts need at least {n} latents, got {n_latents}.")
  return jax.random.choice(rng, n_latents, (n,), replace=False).astype(jnp.int32)


def greedy_assignment(object_scores: np.ndarray, style_scores: np.ndarray | None = None) -> np.ndarray:
  """Greedy concept -> latent assignment from importance scores (host side, numpy).

  Args:
    object_scores: (n_objects, n_latents) scores, or (n_objects, n_steps,
      n_latents), which is averaged over the timesteps first.
    style_scores: same for styles (None or zero rows: no styles).

  Objects are served first, then styles; within a domain, concepts go in
  decreasing order of their best score, and each takes its highest-scoring
  latent not yet taken (ties: lowest latent id).  Returns int32
  (n_objects + n_styles,) in concept order, objects first.
  """
  def as_2d(s, name):
    s = np.asarray(s, np.float64)
    if s.ndim == 3:
      s = s.mean(axis=1)
    if s.ndim != 2:
      raise ValueError(f"greedy_assignment: {name} must be (n_concepts, n_latents) or "
                       f"(n_concepts, n_steps, n_latents), got shape {s.shape}.")
    return s

  obj = as_2d(object_scores, "object_scores")
  n_latents = obj.shape[1]
  sty = np.zeros((0, n_latents)) if style_scores is None else as_2d(style_scores, "style_scores")
  if sty.shape[1] != n_latents:
    raise ValueError(f"greedy_assignment: object scores have {n_latents} latents, style scores {sty.shape[1]}.")
  if obj.shape[0] + sty.shape[0] > n_latents:
    raise ValueError(f"greedy_assignment: {obj.shape[0] + sty.shape[0]} concepts but only {n_latents} latents.")
  taken = np.zeros(n_latents, bool)
  out = []
  for scores in (obj, sty):
    assigned = np.empty(scores.shape[0], np.int32)
    # Stable sort on -best keeps concept order among equal best scores.
    for c in np.argsort(-scores.max(axis=1), kind="stable"):
      row = np.where(taken, -np.inf, scores[c])
      assigned[c] = int(np.argmax(row))
      taken[assigned[c]] = True
    out.append(assigned)
  return np.concatenate(out).astype(np.int32)


# ---------------------------------------------------------------------------
# The loss


def map_mean(z: jax.Array, tokens_per_map: int) -> jax.Array:
  """Average latents over each map's tokens: (n_maps * T, L) or (n_maps, T, L) -> (n_maps, L)."""
  if z.ndim == 2:
    if z.shape[0] % tokens_per_map:
      raise ValueError(f"map_mean: {z.shape[0]} tokens is not a multiple of tokens_per_map={tokens_per_map}.")
    z = z.reshape(-1, tokens_per_map, z.shape[-1])
  elif z.ndim != 3 or z.shape[1] != tokens_per_map:
    raise ValueError(f"map_mean: expected (n_maps * {tokens_per_map}, L) or (n_maps, {tokens_per_map}, L), "
                     f"got shape {z.shape}.")
  return jnp.mean(z, axis=1)


def concept_targets(object_ids: jax.Array, style_ids: jax.Array, n_objects: int, n_styles: int) -> jax.Array:
  """(B, n_objects + n_styles) 0/1 targets over the assigned latents: 1 at the
  sample's object and at its style (none for style -1)."""
  obj = jax.nn.one_hot(object_ids, n_objects)
  sty = jax.nn.one_hot(style_ids, n_styles)  # all zeros for -1
  return jnp.concatenate([obj, sty], axis=-1)


def pearson_sq_mean(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Mean over column pairs (i, j) of corr(a[:, i], b[:, j])^2, correlation across rows."""
  a = a - jnp.mean(a, axis=0)
  b = b - jnp.mean(b, axis=0)
  cov = a.T @ b / a.shape[0]
  sa = jnp.sqrt(jnp.mean(jnp.square(a), axis=0) + eps)
  sb = jnp.sqrt(jnp.mean(jnp.square(b), axis=0) + eps)
  return jnp.mean(jnp.square(cov / (sa[:, None] * sb[None, :])))


def concept_terms(logits: jax.Array, object_ids: jax.Array, style_ids: jax.Array, n_objects: int,
                  n_styles: int, cfg: SupervisedConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch-level terms of the loss from the maps' assigned-latent logits
  z_bar[A] (B, n_objects + n_styles): ``w_sup * L_sup + w_decorr * decorr``
  and the metrics (bce, softmax_ce, l_sup, decorr, object_acc, style_acc).
  Shared by the one-pass loss and the micro-batched one."""
  obj_logits, sty_logits = logits[:, :n_objects], logits[:, n_objects:]
  targets = concept_targets(object_ids, style_ids, n_objects, n_styles)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
  has_style = style_ids >= 0
  n_styled = jnp.sum(has_style)
  ce_obj = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(obj_logits, object_ids))
  obj_acc = jnp.mean((jnp.argmax(obj_logits, axis=-1) == object_ids).astype(jnp.float32))
  if n_styles:
    safe_sty = jnp.where(has_style, style_ids, 0)
    ce_sty_each = optax.softmax_cross_entropy_with_integer_labels(sty_logits, safe_sty)
    ce_sty = jnp.sum(jnp.where(has_style, ce_sty_each, 0.0)) / jnp.maximum(n_styled, 1)
    sty_hit = (jnp.argmax(sty_logits, axis=-1) == style_ids) & has_style
    sty_acc = jnp.sum(sty_hit) / jnp.maximum(n_styled, 1)
    decorr = pearson_sq_mean(obj_logits, sty_logits, cfg.eps)
  else:
    ce_sty = sty_acc = decorr = jnp.zeros((), logits.dtype)
  softmax_ce = ce_obj + ce_sty
  l_sup = bce if cfg.sup_loss == "bce" else softmax_ce
  value = cfg.w_sup * l_sup + cfg.w_decorr * decorr
  return value, {"l_sup": l_sup, "bce": bce, "softmax_ce": softmax_ce, "decorr": decorr,
                 "object_acc": obj_acc, "style_acc": sty_acc.astype(jnp.float32)}


def supervised_loss(params: Params, x_maps: jax.Array, object_ids: jax.Array, style_ids: jax.Array,
                    assignment: jax.Array, cfg: SupervisedConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SAEmnesia's loss on a batch of maps.

  Args:
    x_maps: (B, T, d_in) activations, T tokens per map.
    object_ids: (B,) int in [0, n_objects).
    style_ids: (B,) int in [0, n_styles), or -1 for a map without style.
    assignment: (n_objects + n_styles,) int latent ids, objects first.
    cfg: static settings; cfg.n_objects splits the assignment.

  Softmax option and maps without style: the object term is a softmax
  cross-entropy over the object latents for every map; the style term is a
  softmax cross-entropy over the style latents averaged over the maps that
  have a style only (a no-style map has no correct style latent); L_sup is
  their sum.  With BCE a no-style map simply has all style targets at 0.

  Returns (loss, aux): aux has mse, fvu, l_sup (the optimised one), bce,
  softmax_ce, l1, decorr, object_acc and style_acc (argmax over each domain's
  assigned latents of z_bar == true concept; style accuracy over maps with a
  style, 0 if there are none), l0 and fired (for dead-latent tracking).
  """
  if x_maps.ndim != 3:
    raise ValueError(f"supervised_loss: x_maps must be (B, T, d_in), got shape {x_maps.shape}.")
  n_maps, n_tok, _ = x_maps.shape
  n_objects = cfg.n_objects
  n_styles = assignment.shape[0] - n_objects
  if n_styles < 0:
    raise ValueError(f"supervised_loss: assignment has {assignment.shape[0]} entries < n_objects={n_objects}.")
  n_latents = params["W_enc"].shape[1]

  x = x_maps.reshape(-1, x_maps.shape[-1])
  z = sae_lib.encode_pre(params, x)  # (B*T, L), post-ReLU pre-TopK
  if cfg.batch_topk:
    threshold = sae_lib.resolve_selection(cfg.selection) == "threshold"
    codes = (sae_lib.batch_topk_threshold if threshold else sae_lib.batch_topk)(z, cfg.k)
    x_hat = sae_lib.decode(params, codes)
    fired = sae_lib.fired_from_codes(codes)
    l0 = jnp.sum(codes > 0) / x.shape[0]
  else:
    values, indices = sae_lib.topk(z, cfg.k)
    if cfg.sparse_decode:
      x_hat = sae_lib.decode_sparse(params, values, indices)
    else:
      x_hat = sae_lib.decode(params, sae_lib.scatter_codes(values, indices, n_latents))
    fired = sae_lib.fired_from_sparse(values, indices, n_latents)
    l0 = jnp.mean(jnp.sum(values > 0, axis=-1).astype(jnp.float32))
  mse_ = sae_lib.mse(x, x_hat)

  z_bar = map_mean(z, n_tok)  # (B, L)
  logits = jnp.take(z_bar, assignment, axis=1)  # (B, n_concepts)
  head_value, head = concept_terms(logits, object_ids, style_ids, n_objects, n_styles, cfg)
  l1 = jnp.mean(jnp.abs(z))
  loss = mse_ + cfg.w_l1 * l1 + head_value
  return loss, {"mse": mse_, "fvu": sae_lib.fvu(x, x_hat), **head, "l1": l1, "l0": l0, "fired": fired}


# ---------------------------------------------------------------------------
# Micro-batching: the same update in slices of the batch


def _batch_threshold(z_slices_fn, n_micro: int, keep: int, per_token: int = 0) -> jax.Array:
  """The ``keep``-th largest entry over all slices (BatchTopK's cut), from each
  slice's own ``keep`` largest: the global top set lies in their union. With
  ``per_token`` > 0, from each token's own ``per_token`` largest instead
  (``model.batch_topk_threshold``'s cut: no top_k over a whole slice)."""
  def body(_, i):
    z = z_slices_fn(i)
    if per_token:
      return None, jax.lax.top_k(z, min(per_token, z.shape[-1]))[0].reshape(-1)
    flat = z.reshape(-1)
    return None, jax.lax.top_k(flat, min(keep, flat.shape[0]))[0]
  _, tops = jax.lax.scan(body, None, jnp.arange(n_micro))
  return jax.lax.top_k(tops.reshape(-1), keep)[0][-1]


def accumulated_value_and_grad(params: Params, x_maps: jax.Array, object_ids: jax.Array,
                               style_ids: jax.Array, assignment: jax.Array, cfg: SupervisedConfig,
                               n_micro: int):
  """``jax.value_and_grad(supervised_loss, has_aux=True)`` computed over
  ``n_micro`` slices of the maps, holding one slice's (tokens x latents)
  arrays at a time: the same loss, gradients and metrics (up to float
  summation order), for a batch whose full latent array does not fit.

  The loss is not a sum over maps: L_sup and the decorrelation couple all
  maps through their map-mean logits z_bar[A] (B x n_concepts, small), and
  BatchTopK through its batch-wide cut. So a first pass (forward only) gets
  every map's logits and the BatchTopK threshold; the batch-level terms are
  differentiated with respect to the logits (g); a second pass
  differentiates, per slice, its MSE and L1 shares plus <g, logits(slice)>,
  and the gradients are summed. By the chain rule the sum is the gradient of
  the whole-batch loss. Cost: one extra encoder forward.

  Slice i holds maps i, i + n_micro, ...: with the maps split over devices in
  contiguous blocks, each device's share of a slice stays on that device.
  """
  B, T, d = x_maps.shape
  if B % n_micro:
    raise ValueError(f"supervised micro-batching: {B} maps do not split into {n_micro} slices "
                     "(config.train.micro_batches must divide config.train.batch_size)")
  n_objects = cfg.n_objects
  n_styles = assignment.shape[0] - n_objects
  L = params["W_enc"].shape[1]
  b = B // n_micro
  xs = x_maps.reshape(b, n_micro, T, d).swapaxes(0, 1)  # (n_micro, b, T, d)
  objs = object_ids.reshape(b, n_micro).T
  stys = style_ids.reshape(b, n_micro).T
  n_tok = B * T

  def z_of(p, i):
    return sae_lib.encode_pre(p, xs[i].reshape(-1, d))  # (b*T, L)

  # Pass 1 (no gradients): logits of every map, the BatchTopK cut, x's mean.
  def logits_of(p, i):
    return jnp.take(map_mean(z_of(p, i), T), assignment, axis=1)

  sg = jax.lax.stop_gradient(params)
  _, logits = jax.lax.scan(lambda _, i: (None, logits_of(sg, i)), None, jnp.arange(n_micro))
  per_token = sae_lib.CANDIDATES_PER_K * cfg.k if sae_lib.resolve_selection(cfg.selection) == "threshold" else 0
  thr = (_batch_threshold(lambda i: z_of(sg, i), n_micro, cfg.k * n_tok, per_token) if cfg.batch_topk else None)
  x_mean = jnp.mean(x_maps.reshape(-1, d), axis=0)

  # The batch-level terms, as functions of the logits.
  flat_logits = logits.reshape(B, -1)
  flat_obj, flat_sty = objs.reshape(-1), stys.reshape(-1)

  def head(lg):
    return concept_terms(lg, flat_obj, flat_sty, n_objects, n_styles, cfg)

  (head_value, head_aux), g_logits = jax.value_and_grad(head, has_aux=True)(flat_logits)
  g_logits = g_logits.reshape(logits.shape)

  # Pass 2: per slice, its share of the token terms + <g, logits(slice)>.
  def slice_terms(p, i):
    x = xs[i].reshape(-1, d)
    z = z_of(p, i)
    if cfg.batch_topk:
      codes = jnp.where(z >= thr, z, 0.0)
      x_hat = sae_lib.decode(p, codes)
      fired = sae_lib.fired_from_codes(codes)
      n_active = jnp.sum(codes > 0)
    else:
      values, indices = sae_lib.topk(z, cfg.k)
      x_hat = (sae_lib.decode_sparse(p, values, indices) if cfg.sparse_decode
               else sae_lib.decode(p, sae_lib.scatter_codes(values, indices, L)))
      fired = sae_lib.fired_from_sparse(values, indices, L)
      n_active = jnp.sum(values > 0)
    sq_err = jnp.sum(jnp.square(x_hat - x))
    abs_z = jnp.sum(jnp.abs(z))
    lg = jnp.take(map_mean(z, T), assignment, axis=1)
    value = sq_err / (n_tok * d) + cfg.w_l1 * abs_z / (n_tok * L) + jnp.sum(g_logits[i] * lg)
    var = jnp.sum(jnp.square(x - x_mean))
    return value, (sq_err, abs_z, n_active, fired, jax.lax.stop_gradient(var))

  def body(carry, i):
    grads, sums = carry
    (_, (sq, ab, na, fired, var)), g = jax.value_and_grad(slice_terms, has_aux=True)(params, i)
    grads = jax.tree_util.tree_map(jnp.add, grads, g)
    sums = (sums[0] + sq, sums[1] + ab, sums[2] + na, sums[3] | fired, sums[4] + var)
    return (grads, sums), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  init = (zeros, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                  jnp.zeros((L,), bool), jnp.zeros((), jnp.float32)))
  (grads, (sq, ab, n_active, fired, var)), _ = jax.lax.scan(body, init, jnp.arange(n_micro))
  mse_ = sq / (n_tok * d)
  l1 = ab / (n_tok * L)
  loss = mse_ + cfg.w_l1 * l1 + head_value
  l0 = n_active / n_tok
  return (loss, {"mse": mse_, "fvu": sq / var, "l1": l1, "l0": l0.astype(jnp.float32), "fired": fired,
                 **head_aux}), grads
