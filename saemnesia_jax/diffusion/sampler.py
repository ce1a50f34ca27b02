"""The jitted text-to-image sampler: DDIM (eta 0) with classifier-free guidance.

The whole denoising loop is one ``lax.scan`` inside one ``jax.jit``. What a
run varies over -- prompt token ids, seeds, the guidance scale and the edit's
parameters -- are arguments, so changing them never recompiles; the number of
steps, the image size, the batch size and the hooked block are static.

A sampler can, at one block of the UNet:

* capture the block's output for the *conditional* half of the CFG batch at
  every step: ``captured`` has shape (steps, B, H, W, C) (channels last), the
  input of activation collection;
* edit the block's output for *both* CFG halves with a pure function
  ``edit_fn(edit_params, x, step) -> x``, where ``x`` is (2B, H, W, C) with
  the unconditional half first and ``step`` is the loop index (0 = the
  noisiest step); the latent clamp of unlearning is such a function.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from saemnesia_jax.diffusion import hooks
from saemnesia_jax.diffusion.models import DTYPES, Pipeline

EditFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class SampleOutput(NamedTuple):
  images: jax.Array  # (B, H, W, 3) float32 in [0, 1]
  latents: jax.Array  # (B, C, h, w) final latents (pixels for pixel-space models)
  captured: jax.Array | None  # (steps, B, H', W', C') conditional half, or None


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """The static part of a sampler: changing any field compiles a new one."""
  num_steps: int = 50
  height: int | None = None  # pixels; None: the model's default size
  width: int | None = None
  batch_size: int = 4
  capture_block: str | None = None
  capture_dtype: str = "float32"
  edit_block: str | None = None


class Sampler:
  """A compiled-once sampler. Call it as ``sampler(params, cond_ids,
  uncond_ids, seeds, guidance_scale, edit_params)``.

  ``n_traces`` counts how often JAX traced the loop (1 after any number of
  calls that differ only in argument values).
  """

  def __init__(self, pipe: Pipeline, spec: SamplerSpec, edit_fn: EditFn | None = None):
    self.pipe, self.spec, self.edit_fn = pipe, spec, edit_fn
    self.n_traces = 0
    unet_params = pipe.params["unet"]
    self.capture_path = (hooks.resolve_block(unet_params, spec.capture_block)
                         if spec.capture_block else None)
    if spec.edit_block and edit_fn is None:
      raise ValueError(f"edit_block={spec.edit_block!r} given without an edit_fn")
    if edit_fn is not None and not spec.edit_block:
      raise ValueError("an edit_fn needs spec.edit_block: the block whose output it edits")
    self.edit_path = hooks.resolve_block(unet_params, spec.edit_block) if spec.edit_block else None
    if spec.capture_dtype not in DTYPES:
      raise ValueError(f"unknown capture_dtype {spec.capture_dtype!r}; expected one of {sorted(DTYPES)}")
    height = spec.height or pipe.default_image_size
    width = spec.width or pipe.default_image_size
    f = pipe.vae_scale_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f} (the VAE's scale factor); got {height}x{width}")
    self.height, self.width = height, width
    self.latent_shape = (pipe.latent_channels, height // f, width // f)
    self.scheduler_state = pipe.scheduler.set_timesteps(
        pipe.scheduler.create_state(), spec.num_steps, (spec.batch_size, *self.latent_shape))
    self.timesteps = np.asarray(self.scheduler_state.timesteps)  # (steps,) t per loop index
    self.fn = jax.jit(self._sample)

  def _sample(self, params, cond_ids, uncond_ids, seeds, guidance_scale, edit_params):
    self.n_traces += 1  # runs only while tracing
    pipe, spec = self.pipe, self.spec
    context = pipe.encode_text(params, jnp.concatenate([uncond_ids, cond_ids]))
    noise = self.initial_latents(seeds)
    state = self.scheduler_state
    latents = noise * state.init_noise_sigma
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    body = functools.partial(self.denoise_step, params, context, guidance_scale, edit_params)
    (latents, _), captured = jax.lax.scan(body, (latents, state), jnp.arange(spec.num_steps))
    images = pipe.decode(params, latents)
    return SampleOutput(images=images, latents=latents, captured=captured)

  def denoise_step(self, params, context, guidance_scale, edit_params, carry, step):
    """One denoising step, the loop's body: ((latents, state), step) -> ((latents, state), captured)."""
    pipe, spec = self.pipe, self.spec
    capture_dtype = DTYPES[spec.capture_dtype]
    latents, state = carry
    b = latents.shape[0]
    t = state.timesteps[step]
    x_in = pipe.scheduler.scale_model_input(state, jnp.concatenate([latents] * 2), t)
    x_in = x_in.astype(pipe.dtype)
    kwargs = {}
    if self.capture_path is not None:
      kwargs = dict(capture_intermediates=hooks.capture_filter(self.capture_path),
                    mutable=["intermediates"])
    if self.edit_path is not None:
      edit = lambda x: self.edit_fn(edit_params, x, step).astype(x.dtype)
      with nn.intercept_methods(hooks.edit_interceptor(self.edit_path, edit)):
        out = pipe.unet_apply(params, x_in, t, context, **kwargs)
    else:
      out = pipe.unet_apply(params, x_in, t, context, **kwargs)
    captured = None
    if self.capture_path is not None:
      out, variables = out
      captured = hooks.captured_value(variables["intermediates"], self.capture_path)
      captured = captured[b:].astype(capture_dtype)  # conditional half only
    eps = out.sample.astype(jnp.float32)
    eps_uncond, eps_cond = jnp.split(eps, 2)
    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    latents, state = pipe.scheduler.step(state, eps, t, latents, eta=0.0).to_tuple()
    return (latents, state), captured

  def __call__(self, params, cond_ids, uncond_ids, seeds, guidance_scale, edit_params=None):
    return self.fn(params, cond_ids, uncond_ids, seeds, guidance_scale, edit_params)

  def initial_latents(self, seeds: Sequence[int]) -> jax.Array:
    """The starting noise for ``seeds``, before ``init_noise_sigma`` (as diffusers takes it).

    One key per image: an image depends on its own seed only, not on its batch.
    """
    seeds = jnp.asarray(seeds, jnp.uint32)
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), self.latent_shape))(seeds)

  def block_output_shape(self, block: str | None = None) -> tuple[int, ...]:
    """(H, W, C) of a block's output at this sampler's image size (no compute)."""
    path = hooks.resolve_block(self.pipe.params["unet"], block) if block else self.capture_path
    if path is None:
      raise ValueError("no block given and this sampler captures none")
    b = 1
    x = jax.ShapeDtypeStruct((2 * b, *self.latent_shape), self.pipe.dtype)
    ids = jax.ShapeDtypeStruct((2 * b, self.pipe.max_length), jnp.int32)

    def f(params, x, ids):
      ctx = self.pipe.encode_text(params, ids)
      _, v = self.pipe.unet_apply(params, x, jnp.int32(1), ctx,
                                  capture_intermediates=hooks.capture_filter(path),
                                  mutable=["intermediates"])
      return hooks.captured_value(v["intermediates"], path)
    return tuple(jax.eval_shape(f, self.pipe.params, x, ids).shape[1:])


def sample_prompts(sampler: Sampler, prompts: Sequence[str], seeds: Sequence[int],
                   guidance_scale: float, edit_params=None, params=None, progress: bool = True,
                   on_batch: Callable[[int, SampleOutput], None] | None = None) -> np.ndarray:
  """Runs ``sampler`` over (prompt, seed) pairs in fixed-size batches.

  The last batch is padded (by repeating its first row), so every call uses
  the one compiled sampler. Returns (N, H, W, 3) float32 images; ``on_batch``
  sees each batch's output (trimmed to its real rows) and its start index.
  """
  if len(prompts) != len(seeds):
    raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
  return sample_token_ids(sampler, sampler.pipe.tokenize(prompts), seeds, guidance_scale, edit_params, params,
                          progress, on_batch)


def sample_token_ids(sampler: Sampler, cond: np.ndarray, seeds: Sequence[int], guidance_scale: float,
                     edit_params=None, params=None, progress: bool = True,
                     on_batch: Callable[[int, SampleOutput], None] | None = None) -> np.ndarray:
  """``sample_prompts`` for prompts given as token ids (N, max_length), e.g.
  an adversarial prompt whose tokens need not survive a decode and re-tokenize."""
  cond = np.asarray(cond, np.int32)
  if len(cond) != len(seeds):
    raise ValueError(f"{len(cond)} prompts but {len(seeds)} seeds: give one seed per prompt")
  pipe, bs = sampler.pipe, sampler.spec.batch_size
  params = pipe.params if params is None else params
  uncond = pipe.tokenize([""] * bs)
  seeds = np.asarray(seeds, np.uint32)
  out = []
  n_batches = math.ceil(len(cond) / bs)
  for i in tqdm(range(n_batches), desc="sampling", unit="batch", disable=not progress):
    sl = slice(i * bs, (i + 1) * bs)
    c, s = cond[sl], seeds[sl]
    n = len(c)
    if n < bs:
      c = np.concatenate([c, np.repeat(c[:1], bs - n, 0)])
      s = np.concatenate([s, np.repeat(s[:1], bs - n, 0)])
    res = sampler(params, c, uncond, s, np.float32(guidance_scale), edit_params)
    trimmed = SampleOutput(res.images[:n], res.latents[:n],
                           None if res.captured is None else res.captured[:, :n])
    if on_batch is not None:
      on_batch(i * bs, trimmed)
    out.append(np.asarray(trimmed.images))
  return np.concatenate(out) if out else np.zeros((0, sampler.height, sampler.width, 3), np.float32)
