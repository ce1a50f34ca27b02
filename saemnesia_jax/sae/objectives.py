"""What a training step optimises: SAeUron's unsupervised objective and
SAEmnesia's supervised one, behind one interface (``Objective``).

An objective supplies the loss and its gradient, the batch it takes (tokens,
or whole maps with their labels and the concept -> latent assignment), how a
reader's batch becomes that dict, and the tokens one step sees. The trainer
(``train.train_step``) is the same for both.

This module also picks the unsupervised loss's formulation (``cfg.backward``):
the dense graph of ``model.dense_unsupervised_loss`` or the sparse backward of
``sparse.unsupervised_loss``: the same values and gradients.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from saemnesia_jax.runtime.errors import ConfigError
from saemnesia_jax.sae import model as sae_lib
from saemnesia_jax.sae import sparse as sae_sparse
from saemnesia_jax.sae import supervised

Params = sae_lib.Params
Batch = dict[str, jax.Array]
METRICS = ("fvu", "auxk", "l0", "n_dead", "mse", "l_sup", "bce", "softmax_ce", "l1", "decorr",
           "object_acc", "style_acc")


def unsupervised_loss(params: Params, x: jax.Array, dead_mask: jax.Array,
                      cfg: sae_lib.SaeConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FVU + auxk_alpha * AuxK on tokens x (see ``model.dense_unsupervised_loss``
  for the aux dict); ``cfg.backward`` chooses the formulation."""
  if sae_lib.resolve_backward(cfg.backward) == "sparse":
    return sae_sparse.unsupervised_loss(params, x, dead_mask, cfg)
  return sae_lib.dense_unsupervised_loss(params, x, dead_mask, cfg)


def loss_and_grads(params: Params, x: jax.Array, dead_mask: jax.Array,
                   cfg: sae_lib.SaeConfig) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Params]:
  """``((loss, aux), grads)`` of ``unsupervised_loss``: what a train step needs.

  With the sparse backward and AuxK on, a ``lax.cond`` on "any latent dead"
  picks between the whole loss-and-gradient computed with AuxK and without it
  (the first ~2,400 steps of a run at SD scale have nothing dead). Skipping
  AuxK inside the loss is not enough: the gradient of its skipped branch is
  still a set of full-size zero arrays added to the parameters' gradients.
  Both sides give the same values (AuxK is 0 with nothing dead).
  """
  if not cfg.auxk_alpha or sae_lib.resolve_backward(cfg.backward) != "sparse":
    return jax.value_and_grad(unsupervised_loss, has_aux=True)(params, x, dead_mask, cfg)
  # The encoder matmul and the selection have no gradient and both branches need
  # them: computed once, outside the cond, not compiled into each branch.
  selected = sae_sparse.select(params, x, cfg)
  f = jax.value_and_grad(sae_sparse.unsupervised_loss, has_aux=True)
  without = dataclasses.replace(cfg, auxk_alpha=0.0)
  return jax.lax.cond(jnp.any(dead_mask),
                      lambda p, x, d, s: f(p, x, d, cfg, s),
                      lambda p, x, d, s: f(p, x, d, without, s), params, x, dead_mask, selected)


@dataclasses.dataclass(frozen=True)
class Objective:
  """One training objective.

  name: 'unsupervised' (tokens) or 'supervised' (whole maps with labels).
  per_map: batches are maps of ``tokens_per_map`` tokens with labels.
  loss: (params, dead_mask, batch) -> (loss, aux); the evaluation's value.
  value_and_grad: (params, dead_mask, batch) -> ((loss, aux), grads).
  """
  name: str
  per_map: bool
  loss: Callable[[Params, jax.Array, Batch], tuple[jax.Array, dict]]
  value_and_grad: Callable[[Params, jax.Array, Batch], tuple[tuple[jax.Array, dict], Params]]
  # Unsupervised: the reader draws whole maps and the step sees their tokens
  # (``train.batch_from=maps``: SAeUron's released batches, 16 maps of 256).
  whole_maps: bool = False

  @property
  def reads_maps(self) -> bool:
    return self.per_map or self.whole_maps

  def reader_batch_size(self, batch_size: int, tokens_per_map: int) -> int:
    """Items per reader batch: maps, or tokens (``batch_size`` is tokens unsupervised)."""
    if not self.whole_maps:
      return batch_size
    if batch_size % tokens_per_map:
      raise ConfigError(f"config.train.batch_size={batch_size}: train.batch_from=maps draws whole maps of "
                        f"{tokens_per_map} tokens; give a multiple of {tokens_per_map}, or train.batch_from=tokens")
    return batch_size // tokens_per_map

  def tokens_per_step(self, batch_size: int, tokens_per_map: int) -> int:
    return batch_size * (tokens_per_map if self.per_map else 1)

  def batch_shapes(self, batch_size: int, tokens_per_map: int, d_in: int, dtype: Any,
                   n_concepts: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as shapes (the reader's dtype; labels int32)."""
    if not self.per_map:
      return {"x": jax.ShapeDtypeStruct((batch_size, d_in), dtype)}
    i32 = jnp.int32
    return {"x": jax.ShapeDtypeStruct((batch_size, tokens_per_map, d_in), dtype),
            "object": jax.ShapeDtypeStruct((batch_size,), i32), "style": jax.ShapeDtypeStruct((batch_size,), i32),
            "assignment": jax.ShapeDtypeStruct((n_concepts,), i32)}

  def batch_of(self, raw: Any) -> dict[str, Any]:
    """A reader's batch (tokens; or (maps, labels)) as the step's dict, less the assignment."""
    if not self.per_map:
      return {"x": raw[0].reshape(-1, raw[0].shape[-1]) if self.whole_maps else raw}
    x, labels = raw
    return {"x": x, "object": labels["object"], "style": labels["style"]}


def unsupervised(cfg: sae_lib.SaeConfig, whole_maps: bool = False) -> Objective:
  """SAeUron: FVU + AuxK on tokens (drawn as whole maps with ``whole_maps``)."""
  def loss(params, dead, batch):
    return unsupervised_loss(params, batch["x"], dead, cfg)

  def value_and_grad(params, dead, batch):
    return loss_and_grads(params, batch["x"], dead, cfg)
  return Objective("unsupervised", False, loss, value_and_grad, whole_maps)


def supervised_objective(cfg: supervised.SupervisedConfig, micro_batches: int = 1) -> Objective:
  """SAEmnesia: MSE + w_sup * L_sup + w_l1 * mean|z| + w_decorr * decorrelation on
  whole maps; ``micro_batches`` > 1 computes the same update slice by slice."""
  def loss(params, dead, batch):
    del dead  # no AuxK in the supervised loss
    return supervised.supervised_loss(params, batch["x"], batch["object"], batch["style"], batch["assignment"],
                                      cfg)

  def value_and_grad(params, dead, batch):
    if micro_batches > 1:
      return supervised.accumulated_value_and_grad(params, batch["x"], batch["object"], batch["style"],
                                                   batch["assignment"], cfg, micro_batches)
    return jax.value_and_grad(loss, has_aux=True)(params, dead, batch)
  return Objective("supervised", True, loss, value_and_grad)


def metrics_of(aux: dict, loss: jax.Array) -> dict[str, jax.Array]:
  """The scalars a step reports: the loss and the terms its objective computed."""
  return {"loss": loss, **{k: aux[k] for k in METRICS if k in aux}}


def make_optimizer(learning_rate: float, steps: int, *, lr_decay: str = "linear", final_lr_fraction: float = 0.0,
                   grad_clip: float = 1.0, adam_eps: float = 6.25e-10) -> optax.GradientTransformation:
  """Decoder-gradient projection, global-norm clipping, Adam with a linear or constant rate."""
  if lr_decay == "linear":
    lr = optax.linear_schedule(learning_rate, learning_rate * final_lr_fraction, steps)
  elif lr_decay == "constant":
    lr = learning_rate
  else:
    raise ValueError(f"config.train.lr_decay={lr_decay!r}; expected 'linear' or 'constant'")
  return optax.chain(sae_lib.project_decoder_grads(), optax.clip_by_global_norm(grad_clip),
                     optax.adam(lr, eps=adam_eps))


# ------------------------------------------------------------ from a config


def n_latents(config: Any, d_in: int) -> int:
  return config.sae.n_latents or d_in * config.sae.expansion_factor


def sae_config(config: Any) -> sae_lib.SaeConfig:
  s = config.sae
  return sae_lib.SaeConfig(k=s.k, batch_topk=s.batch_topk, auxk_alpha=s.auxk_alpha,
                           k_aux=s.k_aux or None, dead_tokens_threshold=s.dead_tokens,
                           sparse_decode=s.sparse_decode, backward=s.backward,
                           matmul_dtype=s.get("matmul_dtype") or None, selection=s.get("selection", "exact"))


def from_config(config: Any, n_objects: int) -> Objective:
  """The objective of ``config.sae.mode`` (``train.micro_batches`` for the supervised one)."""
  s, micro = config.sae, config.train.micro_batches
  if s.mode == "unsupervised":
    if micro > 1:
      raise ValueError(f"config.train.micro_batches={micro} applies to the supervised step only: set it to 1")
    return unsupervised(sae_config(config), whole_maps=config.train.get("batch_from", "tokens") == "maps")
  if micro > 1 and config.train.batch_size % micro:
    raise ValueError(f"config.train.micro_batches={micro} must divide config.train.batch_size="
                     f"{config.train.batch_size} (maps per batch)")
  cfg = supervised.SupervisedConfig(n_objects=n_objects, k=s.k, batch_topk=s.batch_topk,
                                    sparse_decode=s.sparse_decode, w_sup=s.w_sup, w_l1=s.w_l1,
                                    w_decorr=s.w_decorr, sup_loss=s.sup_loss, selection=s.get("selection", "exact"))
  return supervised_objective(cfg, micro)


def optimizer_from_config(t: Any) -> optax.GradientTransformation:
  """The optimizer of ``config.train``."""
  return make_optimizer(t.learning_rate, t.steps, lr_decay=t.lr_decay, final_lr_fraction=t.final_lr_fraction,
                        grad_clip=t.grad_clip, adam_eps=t.adam_eps)
