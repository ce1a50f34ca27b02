"""The unsupervised SAE loss with a sparse backward: one dense matmul per token.

``sae.unsupervised_loss`` differentiates the dense graph: the encoder backward
is a second (N, n_latents) matmul, and the dense decoder a third and fourth.
Everything after the TopK selection touches only the selected (token, latent)
pairs, so here the selection is kept as pairs and three ``jax.custom_vjp``
functions give the gradients in O(k * d_in) per token:

  ``encoder_entries``  z_pre at the selected pairs; its backward scatter-adds
                       dpre * (x - b_dec) into the selected rows of W_enc^T
                       (the weight gradient x^T dz with dz sparse) and
                       dpre into b_enc, and gives b_dec its -W_enc @ db_enc.
  ``decode_pairs``     x_hat = sum over the pairs of value * W_dec[latent];
                       its backward is a gather-dot (value gradients) and a
                       scatter-add of value * g into the selected W_dec rows.

Pairs are laid out (k, N): row j holds the j-th pair of every token (TopK),
or any N of the k*N BatchTopK pairs, with their token ids.  The loops run over
the k rows (``lax.fori_loop``) so that no (k*N, d_in) buffer is built.

AuxK runs only while some latent is dead (``lax.switch`` here, and one
``lax.cond`` around the whole step in ``sae.loss_and_grads``).  Its k_aux
(d_in // 2 = 640 at SD shape) latents per token are too many for gathers, so
it works on a dense block of the dead latents: the dead ids, padded to the
smallest of seven static capacities (n_latents / 64 doubling up to all of
them; ``lax.switch``), give (N, C) sub-matmuls whose cost scales with
C / n_latents; the block of all latents takes z_pre as it is.  Its selection
is a mask from a per-row threshold found by bisection (``top_mask``), not a
TopK.

The forward values are those of the dense path (the same selection from the
same z_pre; a narrower block recomputes its columns, equal to float rounding);
the gradients equal the dense ones to float rounding.  Used by
``sae.unsupervised_loss`` when ``SaeConfig.backward`` resolves to "sparse".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from saemnesia_jax.sae import model as sae_lib

Params = sae_lib.Params


# ---------------------------------------------------------------------------
# Pair-wise encoder values and decoder, with sparse backward passes


def _rows(a: jax.Array, tok: jax.Array | None, j) -> jax.Array:
  """Rows of a (N, d) for pair row j: all tokens in order (tok None) or a[tok[j]]."""
  return a if tok is None else jnp.take(a, tok[j], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def encoder_entries(W_t, b_enc, b_dec, x, values, lat, tok):
  """z_pre at the pairs: equals ``values`` (taken from the dense z_pre), with the
  gradient of relu((x[tok] - b_dec) . W_t[lat] + b_enc[lat]).

  Args:
    W_t (L, d): W_enc transposed (its gradient rows are then contiguous).
    b_enc (L,), b_dec (d,): parameters. x (N, d): tokens.
    values (k, N): post-ReLU z_pre at the pairs (no gradient flows into it).
    lat (k, N) int: latent ids. tok (k, N) int or None (row j = tokens 0..N-1).
  """
  del W_t, b_enc, b_dec, x, lat, tok
  return values


def _encoder_fwd(W_t, b_enc, b_dec, x, values, lat, tok):
  return values, (W_t, b_dec, x, values, lat, tok)


def _encoder_bwd(res, dv):
  W_t, b_dec, x, values, lat, tok = res
  L = W_t.shape[0]
  dpre = jnp.where(values > 0, dv, 0.0)  # relu'(0) = 0, as jax.nn.relu
  xc = x - b_dec

  def body(j, acc):
    return acc.at[lat[j]].add(dpre[j][:, None] * _rows(xc, tok, j))

  dW_t = jax.lax.fori_loop(0, lat.shape[0], body, jnp.zeros_like(W_t))
  db_enc = jnp.zeros((L,), dpre.dtype).at[lat.reshape(-1)].add(dpre.reshape(-1))
  # d/d b_dec of (x - b_dec) . w summed over the pairs: -W_enc @ db_enc.
  db_dec = -(db_enc @ W_t)
  return (dW_t, db_enc, db_dec, jnp.zeros_like(x), jnp.zeros_like(values), None, None)


encoder_entries.defvjp(_encoder_fwd, _encoder_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode_pairs(W_dec, values, lat, tok, n_tokens):
  """(n_tokens, d) sum over the pairs of values * W_dec[lat], added to token ``tok``
  (no b_dec).  Shapes as ``encoder_entries``; gathers one row per pair."""
  return _decode_fwd(W_dec, values, lat, tok, n_tokens)[0]


def _decode_fwd(W_dec, values, lat, tok, n_tokens):
  def body(j, acc):
    rows = values[j][:, None] * jnp.take(W_dec, lat[j], axis=0)
    return acc + rows if tok is None else acc.at[tok[j]].add(rows)

  out = jax.lax.fori_loop(0, lat.shape[0], body, jnp.zeros((n_tokens, W_dec.shape[1]), W_dec.dtype))
  return out, (W_dec, values, lat, tok)


def _decode_bwd(n_tokens, res, g):
  del n_tokens
  W_dec, values, lat, tok = res

  def body(j, carry):
    dW, dv = carry
    gj = _rows(g, tok, j)
    dv = dv.at[j].set(jnp.sum(gj * jnp.take(W_dec, lat[j], axis=0), axis=-1))
    return dW.at[lat[j]].add(values[j][:, None] * gj), dv

  dW, dv = jax.lax.fori_loop(0, lat.shape[0], body, (jnp.zeros_like(W_dec), jnp.zeros_like(values)))
  return dW, dv, None, None


decode_pairs.defvjp(_decode_fwd, _decode_bwd)


# ---------------------------------------------------------------------------
# Selection as pairs


def _kth_largest_all(v: jax.Array, k: int) -> jax.Array:
  """The k-th largest value of v >= 0 (any shape): ``_kth_largest`` over all entries."""
  return _kth_largest(v.reshape(1, -1), k)[0]


def _take_first(mask: jax.Array, k: int) -> jax.Array:
  """Flat ids of the first k True entries of ``mask`` (which holds at least k)."""
  return jnp.nonzero(mask.reshape(-1), size=k, fill_value=0)[0]


def _batch_topk_flat(z_pre: jax.Array, k: int, block: int = 16):
  """The entries of ``lax.top_k(z_pre.reshape(-1), k * N)``: (values, flat ids), in
  flat-id order where the block search below applies, else in top_k's order.

  XLA:CPU's TopK is one thread and about 100 ms per pass over SD's z_pre, and
  a row TopK of 4k candidates per token cost 0.25 s of a 1.7 s step; here no
  TopK runs at all, only passes of compare-and-count that use every core:

  1. each ``block`` consecutive latents of a token form a block; t_b is the
     k*N-th largest block maximum (bisection on the float bits);
  2. the batch's k*N largest entries are all >= t_b (k*N blocks hold one
     each), so they lie in the blocks whose maximum is >= t_b (k*N of them,
     more where blocks tie at t_b); those blocks' entries are the candidates;
  3. the k*N-th largest candidate is the batch's; the entries above it, and
     as many tied with it as fit, lowest flat id first (top_k's order), are
     the result.

  Where the blocks tied at t_b overflow a margin of k*N / 64 (e.g. t_b = 0:
  fewer positive blocks than winners), ``lax.cond`` falls back to the flat
  top_k.
  """
  N, L = z_pre.shape
  n = k * N
  nb = L // block
  if L % block or nb < 2 or n >= N * nb:
    return jax.lax.top_k(z_pre.reshape(-1), n)
  bmax = jnp.max(z_pre.reshape(N, nb, block), axis=-1)
  t_b = _kth_largest_all(bmax, n)
  on = bmax >= t_b
  n_on = jnp.sum(on)
  cap = min(N * nb, n + max(64, n // 64))  # room for blocks tied at t_b

  def search():
    ids = _take_first(on, cap)  # ascending block ids = ascending flat ids; n_on of them real
    cand = jnp.take(z_pre.reshape(N * nb, block), ids, axis=0)
    cand = jnp.where((jnp.arange(cap) < n_on)[:, None], cand, -1.0).reshape(-1)  # padding never wins
    flat = (ids[:, None] * block + jnp.arange(block)).reshape(-1)  # row * L + latent
    t = _kth_largest_all(cand, n)
    gt, eq = cand > t, cand == t
    n_gt = jnp.sum(gt)
    keep = jax.lax.cond(n_gt + jnp.sum(eq) > n, lambda: gt | (eq & (jnp.cumsum(eq) <= n - n_gt)),
                        lambda: gt | eq)
    pos = _take_first(keep, n)
    return jnp.take(cand, pos), jnp.take(flat, pos)

  return jax.lax.cond(n_on > cap, lambda: tuple(jax.lax.top_k(z_pre.reshape(-1), n)), search)


def select_pairs(z_pre: jax.Array, k: int, batch_topk: bool):
  """TopK / BatchTopK of z_pre (N, L) as (values, lat, tok), each (k, N).

  tok is None for per-token TopK (row j holds every token's j-th latent).
  BatchTopK keeps the k*N largest entries of the whole batch, the same ones
  as ``sae.batch_topk``; a token may appear in any number of rows.
  """
  N, L = z_pre.shape
  if batch_topk:
    values, flat = _batch_topk_flat(z_pre, k)
    return values.reshape(k, N), (flat % L).reshape(k, N), (flat // L).reshape(k, N)
  values, lat = jax.lax.top_k(z_pre, k)
  return values.T, lat.T, None


# ---------------------------------------------------------------------------
# AuxK on a dense block of the dead latents


def _capacities(n_latents: int) -> tuple[int, ...]:
  """Static block widths for the dead latents: n_latents / 64, / 32, ..., / 2, and
  all.  Halving steps: one dead latent past a capacity at most doubles AuxK's
  matmuls (with quarters, 25% + 1 dead cost 4x of 25%); each width is one more
  branch to compile."""
  caps = sorted({max(1, n_latents // 2 ** i) for i in range(7)})
  return tuple(caps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _encoder_block(W_t, b_enc, b_dec, x, z_block, ids, matmul_dtype=None):
  """z_pre[:, ids] (given as z_block), with the gradient of the dense sub-block
  relu((x - b_dec) @ W_t[ids].T + b_enc[ids]); ids are distinct, or None for
  every latent in order (no gather, no scatter)."""
  del W_t, b_enc, b_dec, x, ids, matmul_dtype
  return z_block


def _block_fwd(W_t, b_enc, b_dec, x, z_block, ids, matmul_dtype):
  del matmul_dtype
  return z_block, (W_t, b_dec, x, z_block, ids)


def _block_bwd(matmul_dtype, res, dz):
  W_t, b_dec, x, z_block, ids = res
  dpre = jnp.where(z_block > 0, dz, 0.0)
  dW_sub = sae_lib.matmul(dpre.T, x - b_dec, matmul_dtype)  # (C, d)
  db_sub = jnp.sum(dpre, axis=0)
  if ids is None:
    return dW_sub, db_sub, -(db_sub @ W_t), None, None, None
  dW = jnp.zeros_like(W_t).at[ids].set(dW_sub, unique_indices=True)
  db_enc = jnp.zeros((W_t.shape[0],), dpre.dtype).at[ids].set(db_sub, unique_indices=True)
  db_dec = -(db_sub @ jnp.take(W_t, ids, axis=0))
  return dW, db_enc, db_dec, None, None, None


_encoder_block.defvjp(_block_fwd, _block_bwd)


def _kth_largest(v: jax.Array, k: int) -> jax.Array:
  """Per row of v (N, C) >= 0, its k-th largest value (N,): a bisection on the
  float bits, which order non-negative floats as integers. 31 passes of
  compare-and-count, no sort: XLA:CPU's TopK for 640 of 5,120 per row was the
  largest part of AuxK. Narrower floats (bfloat16 parameters) are searched as
  float32, which holds them exactly and in the same order."""
  if v.dtype != jnp.float32:
    return _kth_largest(v.astype(jnp.float32), k).astype(v.dtype)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo + 1) // 2
    ok = jnp.sum(bits >= mid[:, None], axis=1) >= k  # the answer is >= mid
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  n = v.shape[0]
  lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.zeros((n,), jnp.int32), jnp.full((n,), 0x7F800000, jnp.int32)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def top_mask(v: jax.Array, k: int) -> jax.Array:
  """The positive entries among each row's k largest of v (N, C) >= 0, as a
  mask; ties at the k-th value go to the lower index, as ``lax.top_k``'s."""
  t = _kth_largest(v, k)[:, None]
  gt = v > t
  eq = (v == t) & (t > 0)
  n_gt = jnp.sum(gt, axis=1, keepdims=True)
  tied = jnp.any(n_gt + jnp.sum(eq, axis=1, keepdims=True) > k)
  return jax.lax.cond(tied, lambda: gt | (eq & (jnp.cumsum(eq, axis=1) <= k - n_gt)), lambda: gt | eq)


def _auxk_block(p: Params, x, z_pre, residual, dead_mask, k_aux: int, capacity: int,
                matmul_dtype: str | None = None):
  """sum ||e_hat - residual||^2 with e_hat from the top-k_aux dead latents, computed
  on the block of the first ``capacity`` dead ids (capacity >= number dead);
  p holds W_t (W_enc^T), b_enc, b_dec and W_dec.

  Only positive activations count (a selected zero adds nothing to e_hat and
  gets no gradient through the ReLU), so the selection is a mask over the
  block, the dead entries' k_aux largest (``top_mask``), and the codes stay dense.
  """
  W_t = p["W_t"]
  if capacity == W_t.shape[0]:  # the block is every latent: z_pre as it is, no gathers and no second matmul
    ids, dead_in_block, z_cols, W_dec = None, dead_mask, z_pre, p["W_dec"]
  else:
    ids = jax.lax.top_k(dead_mask.astype(jnp.int32), capacity)[1]  # dead ids first (ascending)
    dead_in_block = jnp.take(dead_mask, ids)
    # The block's pre-activations by its own matmul, not a column gather of z_pre:
    # XLA:CPU laid the gather out column-major and the row passes of top_mask ran
    # 2.5x slower on it (the matmul costs capacity / L of the encoder's; same
    # values up to float rounding).
    z_cols = jax.lax.stop_gradient(jax.nn.relu(
        sae_lib.matmul(x - p["b_dec"], jnp.take(W_t, ids, axis=0).T, matmul_dtype)
        + jnp.take(p["b_enc"], ids)))
    W_dec = jnp.take(p["W_dec"], ids, axis=0)
  z_block = _encoder_block(W_t, p["b_enc"], p["b_dec"], x, z_cols, ids, matmul_dtype)
  candidates = jnp.where(dead_in_block, z_cols, 0.0)
  codes = jnp.where(top_mask(candidates, min(k_aux, capacity)), z_block, 0.0)
  e_hat = sae_lib.matmul(codes, W_dec, matmul_dtype)
  return jnp.sum(jnp.square(e_hat - residual))


def _auxk_switch(p: Params, x, z_pre, residual, dead_mask, k_aux: int, matmul_dtype, with_grad: bool):
  """The block sum of squares (and, with_grad, its gradient as p's pytree) on the
  smallest capacity that holds every dead latent; branch 0: nothing dead."""
  caps = _capacities(p["W_t"].shape[0])

  def block(c):
    f = functools.partial(_auxk_block, x=x, z_pre=z_pre, residual=residual, dead_mask=dead_mask,
                          k_aux=k_aux, capacity=c, matmul_dtype=matmul_dtype)
    return jax.value_and_grad(f) if with_grad else f

  zero = jnp.zeros((), x.dtype)
  branches = [(lambda q: (zero, jax.tree.map(jnp.zeros_like, q))) if with_grad else (lambda q: zero)]
  branches += [block(c) for c in caps]
  n_dead = jnp.sum(dead_mask)
  index = jnp.where(n_dead == 0, 0, 1 + jnp.sum(jnp.asarray(caps) < n_dead))
  return jax.lax.switch(index, branches, p)


# The switch is never differentiated: its forward under value_and_grad computes the
# gradient inside the taken branch. Differentiating through lax.switch makes every
# branch output the union of all branches' residuals, so each step wrote zeros of
# (N, capacity) for every capacity (with 25% dead, 2.45 -> 2.19 s a step at SD shape
# and 45-53 -> 27 ms at CanvasMini's once the gradient moved inside).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _auxk_sq(p, x, z_pre, residual, dead_mask, k_aux, matmul_dtype):
  return _auxk_switch(p, x, z_pre, residual, dead_mask, k_aux, matmul_dtype, with_grad=False)


def _auxk_sq_fwd(p, x, z_pre, residual, dead_mask, k_aux, matmul_dtype):
  return _auxk_switch(p, x, z_pre, residual, dead_mask, k_aux, matmul_dtype, with_grad=True)


def _auxk_sq_bwd(k_aux, matmul_dtype, grads, ct):
  del k_aux, matmul_dtype
  return jax.tree.map(lambda g: ct * g, grads), None, None, None, None


_auxk_sq.defvjp(_auxk_sq_fwd, _auxk_sq_bwd)


def auxk_loss(params: Params, x, x_hat, z_pre, dead_mask, k_aux: int | None = None, W_t=None,
              matmul_dtype: str | None = None):
  """``sae.auxk_loss`` (same value and gradients), skipped while no latent is dead
  (``lax.switch`` branch 0) and computed on the smallest dense block that holds the
  dead.  W_t: W_enc.T if the caller has it (one transpose per step).  z_pre (the
  step's, after the ReLU) is used as it is by the block of every latent; narrower
  blocks recompute their own columns."""
  W_t = params["W_enc"].T if W_t is None else W_t
  d_in = x.shape[-1]
  k_aux = d_in // 2 if k_aux is None else k_aux
  p = {"W_t": W_t, "b_enc": params["b_enc"], "b_dec": params["b_dec"], "W_dec": params["W_dec"]}
  residual = jax.lax.stop_gradient(x - x_hat)
  sq = _auxk_sq(p, x, jax.lax.stop_gradient(z_pre), residual, dead_mask, k_aux, matmul_dtype)
  scale = jnp.minimum(jnp.sum(dead_mask).astype(x.dtype) / k_aux, 1.0)
  return scale * sq / sae_lib.total_variance(x)


# ---------------------------------------------------------------------------
# The loss


def select(params: Params, x: jax.Array, cfg: sae_lib.SaeConfig):
  """(z_pre, (values, lat, tok)): the one dense matmul and the selected pairs, no
  gradient through either (the gradients come through ``encoder_entries``)."""
  x = x.reshape(-1, x.shape[-1])
  z_pre = jax.lax.stop_gradient(sae_lib.encode_pre(params, x, cfg.matmul_dtype))
  return z_pre, select_pairs(z_pre, cfg.k, cfg.batch_topk)


def unsupervised_loss(params: Params, x: jax.Array, dead_mask: jax.Array, cfg: sae_lib.SaeConfig,
                      selected=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``sae.unsupervised_loss`` with the sparse backward (same value, aux and gradients).
  selected: ``select(params, x, cfg)`` if the caller has it."""
  x = x.reshape(-1, x.shape[-1])
  N, L = x.shape[0], params["W_enc"].shape[1]
  z_pre, (values, lat, tok) = select(params, x, cfg) if selected is None else selected
  W_t = params["W_enc"].T  # the encoder's gradients are built as rows of W_enc^T: one transpose back
  v = encoder_entries(W_t, params["b_enc"], params["b_dec"], x, values, lat, tok)
  x_hat = decode_pairs(params["W_dec"], v, lat, tok, N) + params["b_dec"]
  fvu_ = sae_lib.fvu(x, x_hat)
  if cfg.auxk_alpha:
    aux_ = auxk_loss(params, x, x_hat, z_pre, dead_mask, cfg.k_aux, W_t, cfg.matmul_dtype)
  else:
    aux_ = jnp.zeros((), fvu_.dtype)
  loss = fvu_ + cfg.auxk_alpha * aux_
  fired = sae_lib.fired_from_sparse(values, lat, L)
  l0 = jnp.sum(values > 0) / N
  return loss, {"fvu": fvu_, "auxk": aux_, "l0": l0, "fired": fired,
                "n_dead": jnp.sum(dead_mask).astype(jnp.int32)}
