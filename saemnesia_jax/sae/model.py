"""The TopK sparse autoencoder (docs/method.md section 2) as parameters plus pure functions.

Parameters are a plain dict of arrays (``d_in`` = width of the hooked
activations, ``n_latents`` = dictionary size, ``d_in * expansion``)::

  params = {
    'W_enc': (d_in, n_latents),   # latent axis 1
    'b_enc': (n_latents,),        # latent axis 0
    'W_dec': (n_latents, d_in),   # latent axis 0; each row is one unit-norm dictionary direction
    'b_dec': (d_in,),             # no latent axis (replicated)
  }

The *latent* axis is the one a trainer shards over the ``'model'`` mesh axis
(``param_partition_specs`` gives the ``PartitionSpec`` of each entry); tokens
are sharded over ``'data'``.  Nothing here splits the latent axis by hand: the
TopK selections are ``jax.lax.top_k`` calls on the *global* array, which XLA
partitions correctly (it gathers what it needs), so a sharded step selects
the same latents as a single-device one.

Forward pass (sparsify / SAeUron convention)::

  z_pre = ReLU((x - b_dec) @ W_enc + b_enc)        # encode_pre: post-ReLU, pre-TopK
  z     = TopK(z_pre)                              # per token, or BatchTopK over the batch
  x_hat = z @ W_dec + b_dec                        # decode

All functions take what a jitted step varies over as arguments.  ``k``,
``k_aux`` and the ``batch_topk`` switch set array shapes, so they are static
(Python ints / bools, usually read from a frozen ``SaeConfig`` closed over by
the step); the dead-latent mask and counters are traced arrays.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

Params = dict[str, jax.Array]

# Which axis of each parameter indexes latents (None: no latent axis).
LATENT_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None}

BACKWARDS = ("auto", "sparse", "dense")
SELECTIONS = ("auto", "exact", "threshold")
CANDIDATES_PER_K = 4  # threshold selection: each token offers its top 4k values as BatchTopK candidates
MATMUL_DTYPES = (None, "bfloat16")


def resolve_backward(backward: str, platform: str | None = None) -> str:
  """"sparse" or "dense" for a ``SaeConfig.backward`` value; "auto" picks by platform:
  dense on TPU, by the TPU compiler's figures for SD's step on v5p-8 (the sparse
  backward's gathers and scatters: 8x the memory traffic; benchmarks/README.md)."""
  if backward == "auto":
    return "dense" if (platform or jax.default_backend()) == "tpu" else "sparse"
  return backward


def resolve_selection(selection: str, platform: str | None = None) -> str:
  """"exact" or "threshold" for a ``SaeConfig.selection``; "auto" picks by platform.

  Threshold on TPU: by the TPU compiler's figures for SD's step on v5p-8, the
  scatters into the dense codes and BatchTopK's top_k over the whole gathered
  batch were most of the step's memory traffic (benchmarks/README.md)."""
  if selection == "auto":
    return "threshold" if (platform or jax.default_backend()) == "tpu" else "exact"
  return selection


@dataclasses.dataclass(frozen=True)
class SaeConfig:
  """Static settings of the unsupervised SAE loss (hashable: usable as a jit static arg).

  Attributes:
    k: active latents per token (TopK), or per token on average (BatchTopK).
    batch_topk: train with BatchTopK (keep the k*N largest activations of a
      batch of N tokens; SAeUron's training mode) instead of per-token TopK.
    auxk_alpha: weight of the AuxK loss (1/32 in the papers; 0 disables it and
      removes its computation from the graph).
    k_aux: dead latents used by AuxK; None means d_in // 2.
    dead_tokens_threshold: a latent is dead after more than this many tokens
      without firing (10M in the papers).
    sparse_decode: decode per-token TopK codes by gathering the k active rows
      of W_dec (``decode_sparse``) instead of a dense matmul.  Needs per-token
      TopK (BatchTopK has no fixed count per token).
    backward: "sparse": the gradient of everything after the TopK selection in
      O(k * d_in) per token (``sae_sparse``: one dense matmul per step, AuxK
      skipped while nothing is dead); "dense": differentiate the dense graph
      (the reference); "auto": sparse, except dense on TPU (scatter-adds are
      slow there).  Read by ``unsupervised_loss`` only.
    matmul_dtype: None: the dense matmuls (encoder, AuxK's block, the dense
      decoder) run in the parameters' dtype; "bfloat16": their operands are
      cast to bfloat16 and they accumulate in the parameters' dtype (mixed
      precision: parameters, Adam and the sparse parts stay float32). Twice
      the matmul rate on accelerators (and on CPUs with AVX512-BF16), at
      bfloat16's 8-bit mantissa in the products.
    selection: how the dense backward keeps the codes. "exact": ``lax.top_k``
      and a scatter; "threshold": a mask ``z >= t`` (``batch_topk_threshold``,
      ``topk_mask``, AuxK's ``approx``); "auto": threshold on TPU only.
  """
  k: int = 32
  batch_topk: bool = False
  auxk_alpha: float = 1.0 / 32.0
  k_aux: int | None = None
  dead_tokens_threshold: int = 10_000_000
  sparse_decode: bool = False
  backward: str = "dense"
  matmul_dtype: str | None = None
  selection: str = "exact"

  def __post_init__(self):
    if self.backward not in BACKWARDS:
      raise ValueError(f"SaeConfig.backward={self.backward!r}; expected one of {BACKWARDS}.")
    if self.selection not in SELECTIONS:
      raise ValueError(f"SaeConfig.selection={self.selection!r}; expected one of {SELECTIONS}.")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"SaeConfig.matmul_dtype={self.matmul_dtype!r}; expected one of {MATMUL_DTYPES} "
                       "(None: the parameters' dtype).")
    if self.k < 1:
      raise ValueError(f"SaeConfig.k must be >= 1, got {self.k}.")
    if self.sparse_decode and self.batch_topk:
      raise ValueError("SaeConfig: sparse_decode=True needs per-token TopK; BatchTopK gives a "
                       "variable number of latents per token. Set sparse_decode=False or batch_topk=False.")
    if self.k_aux is not None and self.k_aux < 1:
      raise ValueError(f"SaeConfig.k_aux must be >= 1 or None (d_in // 2), got {self.k_aux}.")


def param_partition_specs(model_axis: str | None = "model") -> dict[str, P]:
  """PartitionSpec of each parameter: the latent axis on ``model_axis``, the rest replicated."""
  specs = {}
  for name, axis in LATENT_AXIS.items():
    ndim = 2 if name.startswith("W_") else 1
    spec = [None] * ndim
    if axis is not None:
      spec[axis] = model_axis
    specs[name] = P(*spec)
  return specs


# ---------------------------------------------------------------------------
# Initialisation


def geometric_median(x: jax.Array, n_iter: int = 100, eps: float = 1e-8) -> jax.Array:
  """Geometric median of the rows of ``x`` (N, d) by Weiszfeld iterations.

  Starts at the mean; each iteration is a weighted mean with weights
  1 / max(||x_i - m||, eps) (the floor keeps the update finite when ``m`` lands
  on a data point).  ``n_iter`` is fixed so the loop is jittable.
  """
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])

  def body(_, m):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=-1), eps)
    return (w @ x) / jnp.sum(w)

  return jax.lax.fori_loop(0, n_iter, body, jnp.mean(x, axis=0))


def init_params(rng: jax.Array, d_in: int, n_latents: int, x_sample: jax.Array | None = None,
                dtype: Any = jnp.float32) -> Params:
  """Initial parameters: unit-norm random W_dec rows, W_enc = W_dec.T, b_enc = 0,
  b_dec = geometric median of ``x_sample`` (N, d_in) (zeros when None)."""
  w = jax.random.normal(rng, (n_latents, d_in), jnp.float32)
  w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
  if x_sample is None:
    b_dec = jnp.zeros((d_in,), jnp.float32)
  else:
    if x_sample.shape[-1] != d_in:
      raise ValueError(f"init_params: x_sample has width {x_sample.shape[-1]}, expected d_in={d_in}.")
    b_dec = geometric_median(x_sample)
  return {
      "W_enc": w.T.astype(dtype),
      "b_enc": jnp.zeros((n_latents,), dtype),
      "W_dec": w.astype(dtype),
      "b_dec": b_dec.astype(dtype),
  }


# ---------------------------------------------------------------------------
# Encoder / decoder


def matmul(a: jax.Array, b: jax.Array, dtype: str | None = None) -> jax.Array:
  """a (..., n) @ b (n, m); with ``dtype`` (``SaeConfig.matmul_dtype``) the
  operands are cast to it and the product accumulates in a's dtype, and so do
  the two matmuls of its gradient (the cotangent cast too)."""
  if dtype is None:
    return a @ b
  if a.dtype != b.dtype or b.ndim != 2:
    raise TypeError(f"matmul in {dtype}: a (..., n) and b (n, m) of one dtype (the accumulator's), got "
                    f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
  return _mixed_matmul(a, b, dtype)


# jax's own transpose of a mixed-precision dot upcasts the low-precision
# operand and multiplies in float32 (no speedup), then rounds the gradient to
# bfloat16: both are wrong for mixed precision, hence the custom rule.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(a, b, dtype):
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=a.dtype)


def _mixed_fwd(a, b, dtype):
  a_lo, b_lo = a.astype(dtype), b.astype(dtype)
  return jnp.matmul(a_lo, b_lo, preferred_element_type=a.dtype), (a_lo, b_lo)


def _mixed_bwd(dtype, res, g):
  a_lo, b_lo = res
  g_lo = g.astype(dtype)  # g has the operands' (accumulator's) dtype
  n, m = b_lo.shape
  return (jnp.matmul(g_lo, b_lo.T, preferred_element_type=g.dtype),
          jnp.matmul(a_lo.reshape(-1, n).T, g_lo.reshape(-1, m), preferred_element_type=g.dtype))


_mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def encode_pre(params: Params, x: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
  """Post-ReLU, pre-TopK latents z_pre (..., n_latents) of activations x (..., d_in)."""
  return jax.nn.relu(matmul(x - params["b_dec"], params["W_enc"], matmul_dtype) + params["b_enc"])


def topk(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Per-token TopK over the last axis: (values, indices), each (..., k), values descending."""
  return jax.lax.top_k(z, k)


def scatter_codes(values: jax.Array, indices: jax.Array, n_latents: int) -> jax.Array:
  """Dense codes (..., n_latents) with ``values`` at ``indices`` and zeros elsewhere."""
  zeros = jnp.zeros(values.shape[:-1] + (n_latents,), values.dtype)
  return jnp.put_along_axis(zeros, indices, values, axis=-1, inplace=False)


def batch_topk(z: jax.Array, k: int) -> jax.Array:
  """BatchTopK: keep the k*N largest entries of z (..., n_latents) over all N tokens.

  Every leading axis counts as the batch (N = prod of leading dims).  Returns
  dense codes of z's shape with exactly k*N entries kept (ties broken by
  ``lax.top_k``'s order); a token may keep more or fewer than k latents.
  """
  n_latents = z.shape[-1]
  n_tokens = z.size // n_latents
  flat = z.reshape(-1)
  values, idx = jax.lax.top_k(flat, k * n_tokens)
  return jnp.zeros_like(flat).at[idx].set(values, unique_indices=True).reshape(z.shape)


_batch_topk = batch_topk  # ``encode`` has an argument of the same name.


def topk_mask(z: jax.Array, k: int) -> jax.Array:
  """Per-token TopK as dense codes by a mask ``z >= t`` (t: each token's k-th
  largest): ``scatter_codes(*topk(z, k))`` but for exact ties at t, without a scatter."""
  t = jax.lax.stop_gradient(jax.lax.top_k(z, k)[0][..., -1:])
  return jnp.where(z >= t, z, 0.0)


def batch_topk_threshold(z: jax.Array, k: int, per_k: int = CANDIDATES_PER_K) -> jax.Array:
  """BatchTopK as a mask ``z >= t``, t the k*N-th largest of the tokens' own
  top ``per_k * k`` values (the candidates: N x per_k * k of them, not N x L).

  The kept set is ``batch_topk``'s (but for exact ties at t) whenever no token
  holds more than ``per_k * k`` of the batch's k*N largest values. Otherwise t
  is lower than BatchTopK's cut and the kept set a superset of it (the
  ``l0`` metric then exceeds k). On a data-sharded batch the global step is
  a top_k over the gathered candidates (N x per_k * k values) instead of the
  whole (N, L) batch, and no scatter builds the codes.
  """
  L = z.shape[-1]
  rows = z.reshape(-1, L)
  n = k * rows.shape[0]
  cand = jax.lax.top_k(rows, min(L, per_k * k))[0]
  t = jax.lax.stop_gradient(jax.lax.top_k(cand.reshape(-1), n)[0][-1])
  return jnp.where(z >= t, z, 0.0)


def encode(params: Params, x: jax.Array, k: int, batch_topk: bool = False) -> jax.Array:
  """Dense sparse codes z (..., n_latents): per-token TopK, or BatchTopK over all tokens of x."""
  z_pre = encode_pre(params, x)
  if batch_topk:
    return _batch_topk(z_pre, k)
  values, indices = topk(z_pre, k)
  return scatter_codes(values, indices, z_pre.shape[-1])


def encode_sparse(params: Params, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Per-token TopK codes in sparse form: (values, indices), each (..., k)."""
  return topk(encode_pre(params, x), k)


def decode(params: Params, z: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
  """x_hat (..., d_in) from dense codes z (..., n_latents)."""
  return matmul(z, params["W_dec"], matmul_dtype) + params["b_dec"]


def decode_sparse(params: Params, values: jax.Array, indices: jax.Array) -> jax.Array:
  """x_hat (..., d_in) from sparse codes: gathers only the k active rows of W_dec.

  Equal to ``decode(params, scatter_codes(values, indices, n_latents))``; costs
  k*d_in per token instead of n_latents*d_in, and materialises a
  (..., k, d_in) gather.
  """
  rows = jnp.take(params["W_dec"], indices, axis=0)  # (..., k, d_in)
  return jnp.einsum("...k,...kd->...d", values, rows) + params["b_dec"]


# ---------------------------------------------------------------------------
# Losses


def _tokens(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


def total_variance(x: jax.Array) -> jax.Array:
  """sum ||x - mean(x)||^2 over the tokens of x (..., d_in): the FVU denominator."""
  x = _tokens(x)
  return jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Fraction of variance unexplained: sum ||x_hat - x||^2 / sum ||x - mean(x)||^2.

  The mean is over all tokens (every leading axis).  Undefined (inf/nan) for a
  batch of identical tokens.
  """
  return jnp.sum(jnp.square(x_hat - x)) / total_variance(x)


def mse(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Mean squared error over all elements (torch ``F.mse_loss`` convention)."""
  return jnp.mean(jnp.square(x_hat - x))


def auxk_loss(params: Params, x: jax.Array, x_hat: jax.Array, z_pre: jax.Array,
              dead_mask: jax.Array, k_aux: int | None = None, matmul_dtype: str | None = None,
              approx: bool = False) -> jax.Array:
  """AuxK: reconstruct the residual x - x_hat with the top-k_aux *dead* latents.

  ``e = stop_gradient(x - x_hat)``; ``e_hat = z_aux @ W_dec`` (no b_dec: it
  models a residual), where z_aux keeps, per token, the k_aux largest z_pre
  among dead latents.  Loss = min(n_dead / k_aux, 1) * sum ||e_hat - e||^2 /
  total_variance(x), so it is in FVU units.  With no dead latent the scale is
  0 and every selected value is masked to 0: the loss is exactly 0.

  Args:
    x, x_hat: (..., d_in). z_pre: (..., n_latents) post-ReLU pre-TopK latents.
    dead_mask: (n_latents,) bool, True for dead latents (traced).
    k_aux: static; None means d_in // 2.  Capped at n_latents for the top_k.
    approx: the cut from ``lax.approx_max_k`` (TPU's one-pass partial reduce,
      recall 0.95; exact elsewhere): never above the exact one, so every one
      of the k_aux largest is kept, with a few more where it missed some.
  """
  d_in, n_latents = x.shape[-1], z_pre.shape[-1]
  k_aux = d_in // 2 if k_aux is None else k_aux
  k_sel = min(k_aux, n_latents)
  x, x_hat, z_pre = _tokens(x), _tokens(x_hat), _tokens(z_pre)
  residual = jax.lax.stop_gradient(x - x_hat)
  # z_pre >= 0, so -1 ranks every live latent below every dead one.
  masked = jnp.where(dead_mask, z_pre, -1.0)
  # The k_sel largest dead latents by a mask against the k_sel-th (no scatter:
  # on TPU a scatter into the (N, L) codes was most of the step's memory
  # traffic). A live latent never passes (dead_mask); with fewer than k_sel
  # dead ones t is -1 and every dead latent is kept, as top_k would.
  top = jax.lax.approx_max_k(masked, k_sel, recall_target=0.95)[0] if approx else jax.lax.top_k(masked, k_sel)[0]
  t = jax.lax.stop_gradient(top[..., -1:])
  e_hat = matmul(jnp.where(dead_mask & (masked >= t), z_pre, 0.0), params["W_dec"], matmul_dtype)
  n_dead = jnp.sum(dead_mask).astype(x.dtype)
  scale = jnp.minimum(n_dead / k_aux, 1.0)
  return scale * jnp.sum(jnp.square(e_hat - residual)) / total_variance(x)


# ---------------------------------------------------------------------------
# Dead-latent tracking

_COUNTER_MAX = jnp.iinfo(jnp.int32).max


def init_dead_counter(n_latents: int) -> jax.Array:
  """Tokens since each latent last fired: (n_latents,) int32, all zero."""
  return jnp.zeros((n_latents,), jnp.int32)


def fired_from_codes(codes: jax.Array) -> jax.Array:
  """(n_latents,) bool: latents with a nonzero code in any token of ``codes`` (..., n_latents)."""
  return jnp.any(_tokens(codes) > 0, axis=0)


def fired_from_sparse(values: jax.Array, indices: jax.Array, n_latents: int) -> jax.Array:
  """(n_latents,) bool from per-token sparse codes: a selected latent with value > 0 fired."""
  hit = (values > 0).reshape(-1).astype(jnp.int32)
  return jnp.zeros((n_latents,), jnp.int32).at[indices.reshape(-1)].max(hit) > 0


def update_dead_counter(counter: jax.Array, fired: jax.Array, n_tokens: int | jax.Array) -> jax.Array:
  """Adds ``n_tokens`` to every counter and resets the latents that fired to 0.

  Saturates at int32 max instead of wrapping round (a never-firing latent
  would otherwise look alive again after 2^31 tokens).
  """
  n = jnp.asarray(n_tokens, jnp.int32)
  grown = counter + jnp.minimum(n, _COUNTER_MAX - counter)
  return jnp.where(fired, 0, grown)


def dead_mask(counter: jax.Array, dead_tokens_threshold: int = 10_000_000) -> jax.Array:
  """(n_latents,) bool: True where a latent has not fired for more than the threshold."""
  return counter > dead_tokens_threshold


# ---------------------------------------------------------------------------
# Decoder constraint


def remove_parallel_grad(W_dec: jax.Array, grad_W_dec: jax.Array) -> jax.Array:
  """Removes from each row of the W_dec gradient its component parallel to that row.

  Divides by the row's squared norm, so the result is orthogonal to the row
  even when the row is not exactly unit norm.
  """
  dot = jnp.sum(grad_W_dec * W_dec, axis=-1, keepdims=True)
  sq = jnp.sum(jnp.square(W_dec), axis=-1, keepdims=True)
  return grad_W_dec - dot / jnp.maximum(sq, jnp.finfo(W_dec.dtype).tiny) * W_dec


def normalize_decoder(params: Params, eps: float = 1e-12) -> Params:
  """Returns params with every W_dec row rescaled to unit L2 norm."""
  w = params["W_dec"]
  norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
  return {**params, "W_dec": w / jnp.maximum(norm, eps)}


def project_decoder_grads() -> optax.GradientTransformation:
  """optax transformation applying ``remove_parallel_grad`` to the W_dec update.

  Put it first in the chain, so the projection acts on the raw gradient
  (as sparsify does), e.g.
  ``optax.chain(project_decoder_grads(), optax.clip_by_global_norm(1.0), optax.adam(...))``,
  and call ``normalize_decoder`` on the parameters after ``optax.apply_updates``.
  """

  def f(updates, params):
    if params is None:
      raise ValueError("project_decoder_grads needs the parameters: call tx.update(grads, state, params).")
    return {**updates, "W_dec": remove_parallel_grad(params["W_dec"], updates["W_dec"])}

  return optax.stateless(f)


# ---------------------------------------------------------------------------
# The unsupervised (SAeUron) objective


def dense_unsupervised_loss(params: Params, x: jax.Array, dead_mask: jax.Array,
                      cfg: SaeConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FVU + auxk_alpha * AuxK on a batch of tokens x (N, d_in) (leading axes are flattened).

  Returns (loss, aux) with aux:
    fvu, auxk: the two terms (scalars);
    l0: mean number of active latents per token;
    fired: (n_latents,) bool, latents that fired in this batch (feed it to
      ``update_dead_counter`` together with N);
    n_dead: number of dead latents in ``dead_mask``.

  Autodiff of this graph is the dense backward; ``objectives.unsupervised_loss``
  picks it or ``sparse.unsupervised_loss`` by ``cfg.backward`` (same values
  and gradients).
  """
  x = _tokens(x)
  n_latents = params["W_enc"].shape[1]
  z_pre = encode_pre(params, x, cfg.matmul_dtype)
  threshold = resolve_selection(cfg.selection) == "threshold"
  select = (batch_topk_threshold if threshold else batch_topk) if cfg.batch_topk else (
      topk_mask if threshold and not cfg.sparse_decode else None)  # None: per-token TopK kept sparse
  if select is not None:
    codes = select(z_pre, cfg.k)
    x_hat = decode(params, codes, cfg.matmul_dtype)
    fired = fired_from_codes(codes)
    l0 = jnp.sum(codes > 0) / x.shape[0]
  else:
    values, indices = topk(z_pre, cfg.k)
    if cfg.sparse_decode:
      x_hat = decode_sparse(params, values, indices)
    else:
      x_hat = decode(params, scatter_codes(values, indices, n_latents), cfg.matmul_dtype)
    fired = fired_from_sparse(values, indices, n_latents)
    l0 = jnp.mean(jnp.sum(values > 0, axis=-1).astype(jnp.float32))
  fvu_ = fvu(x, x_hat)
  if cfg.auxk_alpha:
    aux_ = auxk_loss(params, x, x_hat, z_pre, dead_mask, cfg.k_aux, cfg.matmul_dtype, approx=threshold)
  else:
    aux_ = jnp.zeros((), fvu_.dtype)
  loss = fvu_ + cfg.auxk_alpha * aux_
  return loss, {"fvu": fvu_, "auxk": aux_, "l0": l0, "fired": fired,
                "n_dead": jnp.sum(dead_mask).astype(jnp.int32)}
