"""The model layer: the one module that imports diffusers and transformers.

diffusers removed its Flax classes in 0.40 and transformers removed Flax in
5.0, so every use of ``FlaxUNet2DConditionModel``, ``FlaxCLIPTextModel``,
``FlaxAutoencoderKL`` and ``FlaxDDIMScheduler`` lives here; swapping the
backend later is a change to this file alone.

A *pipeline directory* has the Stable Diffusion v1.x diffusers layout::

    unet/          config.json + diffusion_flax_model.msgpack
                   (or diffusion_pytorch_model.{bin,safetensors})
    text_encoder/  config.json + flax_model.msgpack (or model.safetensors / pytorch_model.bin)
    tokenizer/     a CLIP BPE tokenizer (vocab.json, merges.txt) or tokenizer.json
    scheduler/     scheduler_config.json (any SD scheduler config; read as DDIM)
    vae/           optional: absent for pixel-space models

:func:`load_pipeline` reads it (Flax weights, or PyTorch weights converted on
load, which needs ``torch``). The other modules of the model layer build on
this one and import no diffusers or transformers themselves:
``diffusion/tiny.py`` writes a small random pipeline with SD's block structure,
``diffusion/torch_export.py`` converts one to PyTorch weights, and
``judges/vit.py`` loads the UnlearnCanvas ViT classifiers.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# diffusers prints a deprecation warning per Flax module it imports; this
# project pins diffusers<0.40 on purpose, so keep the console readable.
warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
import diffusers  # noqa: E402
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

from saemnesia_jax.runtime.errors import UserError  # noqa: E402
from saemnesia_jax.runtime.io_utils import hash_files  # noqa: E402

_diffusers_logging.set_verbosity_error()
_transformers_logging.set_verbosity_error()

from diffusers import (  # noqa: E402
    FlaxAutoencoderKL,
    FlaxDDIMScheduler,
    FlaxUNet2DConditionModel,
)
from flax.traverse_util import flatten_dict  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPTextConfig,
    FlaxCLIPTextModel,
    FlaxViTForImageClassification,
    PreTrainedTokenizerFast,
    ViTConfig,
)
import msgpack
from flax import serialization
import types

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

UNET_FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
UNET_PT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TEXT_FLAX_WEIGHTS = "flax_model.msgpack"
TEXT_PT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
VAE_FLAX_WEIGHTS = UNET_FLAX_WEIGHTS
VAE_PT_WEIGHTS = UNET_PT_WEIGHTS


class ModelLoadError(UserError):
  """A pipeline directory is missing something or holds the wrong thing."""


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A loaded text-to-image pipeline: Flax modules (static) + params (a pytree).

  The modules are hashable configuration; everything numeric is in
  ``params`` = {'unet', 'text_encoder', 'vae' (if any)}, so jitted functions
  close over the modules and take ``params`` as an argument.
  """
  path: str
  unet: Any  # FlaxUNet2DConditionModel (a flax.linen Module)
  text_encoder: Any  # FlaxCLIPTextModel (a transformers wrapper; .module is linen)
  tokenizer: Any
  scheduler: Any  # FlaxDDIMScheduler
  vae: Any | None  # FlaxAutoencoderKL or None for pixel-space models
  params: dict
  dtype: Any
  weight_files: tuple[str, ...] = ()

  @property
  def latent_channels(self) -> int:
    return int(self.unet.in_channels)

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent cell (1 for pixel-space models)."""
    if self.vae is None:
      return 1
    return 2 ** (len(self.vae.block_out_channels) - 1)

  @property
  def default_image_size(self) -> int:
    return int(self.unet.sample_size) * self.vae_scale_factor

  @property
  def max_length(self) -> int:
    return int(self.text_encoder.config.max_position_embeddings)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> (B, max_length) int32 token ids, padded and truncated."""
    if isinstance(prompts, str):
      prompts = [prompts]
    warn_changed_prompts(self.tokenizer, prompts, self.max_length)
    ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                         truncation=True, return_tensors="np").input_ids
    return ids.astype(np.int32)

  def encode_text(self, params: dict, ids: jax.Array) -> "TextCond":
    """(B, L) token ids -> the UNet's text conditioning (see ``TextCond``)."""
    return text_condition(self.text_encoder, params["text_encoder"], ids)

  def unet_apply(self, params: dict, latents_nchw: jax.Array, t: jax.Array,
                 context: "TextCond | jax.Array", **apply_kwargs):
    """One UNet call; extra kwargs (capture_intermediates, mutable) go to apply."""
    return unet_forward(self.unet, params["unet"], latents_nchw, t, context, **apply_kwargs)

  def decode(self, params: dict, latents_nchw: jax.Array) -> jax.Array:
    """Final latents -> (B, H, W, 3) float32 images in [0, 1]."""
    x = latents_nchw
    if self.vae is not None:
      x = x / self.vae.scaling_factor
      x = self.vae.apply({"params": params["vae"]}, x, method=self.vae.decode).sample
    return (x.astype(jnp.float32) / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)

  def weights_hash(self) -> str:
    """SHA-256 of the weight files this pipeline was loaded from."""
    return hash_files(list(self.weight_files))


_WARNED: set = set()  # (tokenizer, prompt): each said once per process


def warn_changed_prompts(tokenizer, prompts: Sequence[str], max_length: int) -> None:
  """One line on stderr per prompt the text encoder will not read as written: longer than
  ``max_length`` tokens (cut), or words outside a word-level vocabulary (CanvasMini's: <unk>)."""
  for p in dict.fromkeys(prompts):
    if not p or (id(tokenizer), p) in _WARNED:
      continue
    enc = tokenizer(p, truncation=False, verbose=False, return_offsets_mapping=True)
    why = [f"{len(enc.input_ids)} tokens, cut to the first {max_length}"] if len(enc.input_ids) > max_length else []
    unk = [p[a:b] for i, (a, b) in zip(enc.input_ids, enc.offset_mapping) if i == tokenizer.unk_token_id is not None]
    if unk:
      why.append(f"{', '.join(map(repr, unk))} not in the vocabulary, read as {tokenizer.unk_token}")
    if why:
      _WARNED.add((id(tokenizer), p))
      print(f"warning: prompt {p!r}: {'; '.join(why)}", file=sys.stderr)


class TextCond(NamedTuple):
  """The text conditioning of a UNet call.

  ``hidden`` (B, L, D): CLIP's last hidden state, read by cross-attention (SD v1.x).
  ``pooled`` (B, D): CLIP's pooled output (at the eos token), added to the timestep
  embedding by UNets with ``addition_embed_type='text_time'`` (SDXL's global
  conditioning; CanvasMini uses it so that the object reaches every ResNet block).
  """
  hidden: jax.Array
  pooled: jax.Array


def text_condition(text_encoder, text_params, ids: jax.Array) -> TextCond:
  out = text_encoder.module.apply(
      {"params": text_params}, ids, attention_mask=jnp.ones_like(ids),
      position_ids=jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape), deterministic=True)
  return TextCond(out[0], out[1])


def unet_forward(unet, unet_params, latents_nchw: jax.Array, t: jax.Array, context, **apply_kwargs):
  """One UNet call with SD-style (cross-attention) or SDXL-style (+ pooled text) conditioning."""
  cond = context if isinstance(context, TextCond) else TextCond(context, None)
  b = latents_nchw.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
  if unet.addition_embed_type == "text_time":
    if cond.pooled is None:
      raise ValueError("this UNet (addition_embed_type='text_time') needs the pooled text embedding: "
                       "pass a TextCond from encode_text")
    n_ids = (unet.projection_class_embeddings_input_dim - cond.pooled.shape[-1]) // unet.addition_time_embed_dim
    apply_kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled,
                                         "time_ids": jnp.zeros((b, n_ids), cond.pooled.dtype)}
  return unet.apply({"params": unet_params}, latents_nchw, t, encoder_hidden_states=cond.hidden, **apply_kwargs)


def parse_dtype(dtype) -> Any:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  if dtype in DTYPES.values():
    return dtype
  raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")


def _find_weights(folder: str, flax_name: str, pt_names: Sequence[str], from_pt: bool | None):
  """Returns (file, is_pt) for the weights in ``folder``, preferring Flax."""
  flax_file = os.path.join(folder, flax_name)
  pt_files = [os.path.join(folder, n) for n in pt_names if os.path.isfile(os.path.join(folder, n))]
  if from_pt is not True and os.path.isfile(flax_file):
    return flax_file, False
  if from_pt is not False and pt_files:
    return pt_files[0], True
  wanted = [flax_name] if from_pt is False else list(pt_names) if from_pt else [flax_name, *pt_names]
  found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  raise ModelLoadError(
      f"no weights in {folder}: expected one of {wanted}, found {found}. "
      "A diffusers-format directory (save_pretrained) holds Flax or PyTorch weights here.")


def _check_folder(path: str, sub: str) -> str:
  folder = os.path.join(path, sub)
  if not os.path.isdir(folder):
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise ModelLoadError(
        f"{path} is not a diffusers pipeline directory: missing folder '{sub}/' "
        f"(found {present}). Expected unet/, text_encoder/, tokenizer/, scheduler/ and optionally vae/.")
  if not os.path.isfile(os.path.join(folder, "config.json")) and sub not in ("tokenizer", "scheduler"):
    raise ModelLoadError(f"missing {os.path.join(folder, 'config.json')}: expected a diffusers/transformers config")
  return folder


def _load_pt_state_dict(file: str):
  try:
    import torch  # noqa: F401  (deferred: torch is optional)
  except ImportError as e:
    raise ModelLoadError(
        f"{file} holds PyTorch weights; reading them needs torch. Install the CPU build "
        "(`pip install torch==2.13.0` here, or `pip install saemnesia_jax[torch]`), or convert "
        "the checkpoint to Flax weights once.") from e
  from diffusers.models.modeling_utils import load_state_dict  # deferred: PyTorch weights only
  return load_state_dict(file)


def tree_mismatches(expected, params) -> list[str]:
  """Names missing or extra in ``params`` against the abstract tree
  ``expected``, then the leaves whose shapes differ."""
  expected, got = flatten_dict(expected), flatten_dict(params)
  bad = sorted("/".join(k) for k in set(expected) ^ set(got))
  return bad + sorted(f"{'/'.join(k)}: {got[k].shape} vs {expected[k].shape}"
                      for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k].shape))


def _check_params(name: str, module, params, file: str) -> None:
  """Refuses weights whose parameter tree does not match the module's config."""
  expected = flatten_dict(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)))
  got = flatten_dict(params)
  missing = sorted("/".join(k) for k in set(expected) - set(got))
  bad = sorted(f"{'/'.join(k)}: {got[k].shape} vs {expected[k].shape}"
               for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k].shape))
  if missing or bad:
    raise ModelLoadError(
        f"{name} weights in {file} do not match its config.json: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(bad)} of the wrong shape (e.g. {bad[:3]}). "
        "Is the config from the same checkpoint?")


def cast_params(params, dtype):
  if dtype == jnp.float32:
    return params
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _to_device(x, dtype):
  """One host leaf -> a device array, floating leaves cast to ``dtype`` on the host first."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16:
    x = x.astype(dtype, copy=False)
  return jnp.asarray(x)


def _place_leaves(params, dtype):
  """Host params (nested dicts of numpy) -> device arrays in ``dtype``, one leaf
  at a time, dropping each host leaf as soon as it is placed."""
  out = {}
  for k in list(params):
    v = params.pop(k)
    out[k] = _place_leaves(dict(v), dtype) if hasattr(v, "keys") else _to_device(v, dtype)
    del v
  return out


def read_flax_weights(file: str, dtype) -> dict:
  """A Flax msgpack weights file -> params on the device, in ``dtype``.

  The file is streamed and every array is cast and placed as it is read, so
  the host holds one copy of the weights in the target dtype (plus one array
  in flight) instead of the file's bytes, their float32 arrays and the cast
  copy side by side.
  """

  def hook(code, data):
    out = serialization._msgpack_ext_unpack(code, data)
    return _to_device(out, dtype) if isinstance(out, np.ndarray) else out

  with open(file, "rb") as f:
    # max_buffer_size=0: no cap (one array can be larger than msgpack's 100 MiB default).
    unpacker = msgpack.Unpacker(f, ext_hook=hook, raw=False, strict_map_key=False,
                                max_buffer_size=0, read_size=1 << 20)
    try:
      state = unpacker.unpack()
    except Exception as e:  # msgpack raises several types on a bad file
      raise ModelLoadError(f"cannot read Flax weights {file}: {e}") from e
  # Arrays over 1 GiB are stored in chunks (flax); rejoin them (rare: none in SD).
  state = serialization._unchunk_array_leaves_in_place(state)
  return jax.tree_util.tree_map(lambda x: _to_device(x, dtype) if isinstance(x, np.ndarray) else x, state)


ATTENTION = ("auto", "plain", "memory_efficient")
# 'auto' turns on the chunked attention for UNets whose default latent has at
# least this many positions (SD v1.5: 64 x 64): there one plain attention map
# per row and head is 4096 x 4096 and the maps of a batch of 8 with CFG take
# gigabytes; below it the plain einsum is faster.
AUTO_MEMORY_EFFICIENT_TOKENS = 64 * 64


def _memory_efficient(attention: str, unet_config: dict) -> bool:
  if attention not in ATTENTION:
    raise ValueError(f"config.model.attention={attention!r}; expected one of {ATTENTION}")
  if attention == "auto":
    return int(unet_config.get("sample_size", 0)) ** 2 >= AUTO_MEMORY_EFFICIENT_TOKENS
  return attention == "memory_efficient"


# The Flax VAE's attention keeps diffusers' old names (query/key/value/
# proj_attn); current PyTorch checkpoints use to_q/to_k/to_v/to_out.0, and
# diffusers' converters do not translate them (the weights would be dropped).
_VAE_ATTN_PT_TO_FLAX = ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                        (".to_out.0.", ".proj_attn."))
_VAE_ATTN_FLAX_TO_PT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def _rename(key: str, pairs) -> str:
  for a, b in pairs:
    key = key.replace(a, b)
  return key


def _abstract(init, dtype):
  """The parameter shapes ``init(rng)`` would give, as ShapeDtypeStructs in ``dtype`` (nothing allocated)."""
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), dict(shapes))


def _load_diffusers_model(cls, folder: str, flax_name: str, pt_names, from_pt, dtype, abstract=False,
                          **module_kwargs):
  """(module, params in ``dtype`` on the device, weights file) of a diffusers model folder;
  ``abstract``: shapes only, from config.json (no weights file needed)."""
  model = cls.from_config(cls.load_config(folder), dtype=dtype, **module_kwargs)
  if abstract:
    return model, _abstract(model.init_weights, dtype), ""
  file, is_pt = _find_weights(folder, flax_name, pt_names, from_pt)
  if not is_pt:
    params = read_flax_weights(file, dtype)
  else:
    # diffusers' own from_pt only looks for the .bin file; converting here
    # also reads .safetensors.
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # deferred
    state = _load_pt_state_dict(file)
    if cls is FlaxAutoencoderKL:
      state = {_rename(k, _VAE_ATTN_PT_TO_FLAX): v for k, v in state.items()}
    params = convert_pytorch_state_dict_to_flax(state, model)
    del state
    params = _place_leaves(dict(params), dtype)
  _check_params(cls.__name__, model, params, file)
  return model, params, file


def _load_text_encoder(folder: str, from_pt, dtype, abstract=False):
  """(FlaxCLIPTextModel without params of its own, params in ``dtype``, weights file)."""
  # _do_init=False: the wrapper keeps no float32 copy of its own beside ours.
  model = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(folder), dtype=dtype, _do_init=False)
  shape = (1, int(model.config.max_position_embeddings))
  if abstract:
    return model, _abstract(lambda rng: model.init_weights(rng, shape), dtype), ""
  file, is_pt = _find_weights(folder, TEXT_FLAX_WEIGHTS, TEXT_PT_WEIGHTS, from_pt)
  if is_pt:  # transformers' converter needs a wrapper that holds params
    params = FlaxCLIPTextModel.from_pretrained(folder, dtype=dtype, from_pt=True, _do_init=True).params
    params = _place_leaves(dict(params), dtype)
  else:
    params = read_flax_weights(file, dtype)
  bad = tree_mismatches(jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), shape)), params)
  if bad:
    raise ModelLoadError(f"text encoder weights in {file} do not match its config.json: {bad[:3]}. "
                         "Is the config from the same checkpoint?")
  return model, params, file


def load_pipeline(path: str, dtype: str = "float32", from_pt: bool | None = None,
                  attention: str = "auto", abstract: bool = False) -> Pipeline:
  """Loads a diffusers-format pipeline directory (see the module docstring).

  Args:
    path: the pipeline directory.
    dtype: compute and parameter dtype: 'float32', 'bfloat16' or 'float16';
      the weights are cast as they are read (one host copy, in this dtype).
    from_pt: True to read PyTorch weights, False for Flax only, None (default)
      for Flax weights where present, else PyTorch.
    attention: the UNet's attention: 'plain', 'memory_efficient' (diffusers'
      chunked attention: no full attention map is held) or 'auto' (chunked for
      UNets of 64 x 64 latents or more, e.g. SD v1.5 at 512 px).
    abstract: parameters as ``jax.ShapeDtypeStruct`` from the config files
      alone (no weights read or needed): for compile-only sizing (dry runs).
  """
  jdtype = parse_dtype(dtype)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ModelLoadError(f"pipeline directory {path} does not exist")
  missing = [s for s in ("unet", "text_encoder", "tokenizer", "scheduler")  # abstract: no tokenizer needed
             if not os.path.isdir(os.path.join(path, s)) and not (abstract and s == "tokenizer")]
  if missing:
    raise ModelLoadError(
        f"{path} is not a diffusers pipeline directory: missing folder '{missing[0]}/' "
        f"(missing: {missing}; found {sorted(os.listdir(path))}). Expected unet/, text_encoder/, "
        "tokenizer/, scheduler/ and optionally vae/.")
  for sub in ("unet", "text_encoder"):
    _check_folder(path, sub)

  unet_dir = os.path.join(path, "unet")
  mem_eff = _memory_efficient(attention, FlaxUNet2DConditionModel.load_config(unet_dir))
  unet, unet_params, unet_file = _load_diffusers_model(
      FlaxUNet2DConditionModel, unet_dir, UNET_FLAX_WEIGHTS, UNET_PT_WEIGHTS,
      from_pt, jdtype, abstract, use_memory_efficient_attention=mem_eff)
  text_encoder, te_params, te_file = _load_text_encoder(os.path.join(path, "text_encoder"), from_pt, jdtype,
                                                        abstract)

  vae = vae_params = None
  files = [unet_file, te_file]
  if os.path.isdir(os.path.join(path, "vae")):
    _check_folder(path, "vae")
    vae, vae_params, vae_file = _load_diffusers_model(
        FlaxAutoencoderKL, os.path.join(path, "vae"), VAE_FLAX_WEIGHTS, VAE_PT_WEIGHTS, from_pt, jdtype, abstract)
    files.append(vae_file)

  try:  # an abstract pipeline without one: only max_length (the text encoder's) is used
    tokenizer = (None if abstract and not os.path.isdir(os.path.join(path, "tokenizer"))
                 else AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")))
  except Exception as e:  # transformers raises many types here
    raise ModelLoadError(
        f"cannot read the tokenizer in {os.path.join(path, 'tokenizer')}: {e}. Expected a CLIP "
        "tokenizer (vocab.json + merges.txt) or a tokenizer.json with tokenizer_config.json.") from e

  sched_dir = os.path.join(path, "scheduler")
  sched_config = FlaxDDIMScheduler.load_config(sched_dir)
  # Any SD scheduler config (PNDM, DDIM, ...) carries the beta schedule; it
  # is read as DDIM, the sampler of docs/method.md.
  scheduler = FlaxDDIMScheduler.from_config(sched_config, dtype=jnp.float32)

  params = {"unet": unet_params, "text_encoder": te_params}
  if vae is not None:
    params["vae"] = vae_params
  return Pipeline(path=path, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                  scheduler=scheduler, vae=vae, params=params, dtype=jdtype,
                  weight_files=tuple(f for f in files if f))


def weight_files(path: str, from_pt: bool | None = None) -> list[str]:
  """The weight files ``load_pipeline`` reads, in its order (unet, text encoder, vae)."""
  path = os.path.abspath(os.path.expanduser(path))
  files = [_find_weights(os.path.join(path, "unet"), UNET_FLAX_WEIGHTS, UNET_PT_WEIGHTS, from_pt)[0],
           _find_weights(os.path.join(path, "text_encoder"), TEXT_FLAX_WEIGHTS, TEXT_PT_WEIGHTS, from_pt)[0]]
  if os.path.isdir(os.path.join(path, "vae")):
    files.append(_find_weights(os.path.join(path, "vae"), VAE_FLAX_WEIGHTS, VAE_PT_WEIGHTS, from_pt)[0])
  return files


def weights_hash(path: str, from_pt: bool | None = None) -> str:
  """SHA-256 of a pipeline directory's weights, without loading it (= Pipeline.weights_hash)."""
  return hash_files(weight_files(path, from_pt))


def torch_side() -> Any:
  """diffusers' and transformers' PyTorch classes and Flax -> PyTorch
  converters (deferred: torch is an optional dependency)."""
  from diffusers import AutoencoderKL, UNet2DConditionModel  # deferred: needs torch (optional)
  from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model
  from transformers import CLIPTextModel  # deferred: needs torch
  from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model
  return types.SimpleNamespace(AutoencoderKL=AutoencoderKL, UNet2DConditionModel=UNet2DConditionModel,
                               CLIPTextModel=CLIPTextModel, CLIPTextConfig=CLIPTextConfig,
                               load_flax_weights_in_pytorch_model=load_flax_weights_in_pytorch_model,
                               load_flax_checkpoint_in_pytorch_model=load_flax_checkpoint_in_pytorch_model)
