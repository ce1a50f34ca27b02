"""A tiny random pipeline with Stable Diffusion's block structure (cross-attention
down and up blocks), for tests, examples and the random-weights SD runs; and
``save_pipeline``, which writes any pipeline in the diffusers layout. The
classes come through ``models`` (the one module importing diffusers and
transformers)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Sequence

import jax
import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from saemnesia_jax.diffusion import models, torch_export
from saemnesia_jax.diffusion.models import (CLIPTextConfig, FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxDDIMScheduler,
                                            FlaxUNet2DConditionModel, PreTrainedTokenizerFast)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
DEFAULT_WORDS = (
    "a an the of in image photo picture style painting drawing with and on "
    "cat dog circle square ring bar cross star tree house car boat bird fish "
    "red green blue black white bright dark stripes dots checker neon pastel").split()


def build_word_tokenizer(words: Sequence[str], max_length: int) -> PreTrainedTokenizerFast:
  """An offline word-level tokenizer (lower-case, punctuation split off).

  Ids: 0 <pad>, 1 <unk>, 2 <bos>, 3 <eos>, then ``words``; every sequence is
  ``<bos> words... <eos>`` padded with <pad>. Unknown words map to <unk>.
  """
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for w in (*words, ".", ",", "'"):
    w = w.lower()
    if w not in vocab:
      vocab[w] = len(vocab)
  tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
      unk_token="<unk>", model_max_length=max_length)


@dataclasses.dataclass(frozen=True)
class TinySpec:
  """Shape of a small SD-like pipeline.

  ``block_out_channels`` are multiples of 32 (diffusers' GroupNorm has 32
  groups). With three levels, ``up_blocks.1`` is the middle resolution, as
  ``up_blocks.1`` of SD (4 levels) is the second-coarsest.
  """
  sample_size: int = 16  # latent (or pixel) side
  in_channels: int = 4
  block_out_channels: tuple[int, ...] = (32, 64, 64)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  layers_per_block: int = 1
  num_heads: int = 2  # diffusers calls this attention_head_dim (a naming quirk)
  text_width: int = 32
  text_layers: int = 2
  text_heads: int = 2
  max_length: int = 16
  vae: bool = True
  vae_channels: tuple[int, ...] = (32, 32)
  words: tuple[str, ...] = tuple(DEFAULT_WORDS)


def tiny_components(spec: TinySpec, seed: int = 0):
  """Builds random (unet, unet_params, text_encoder, tokenizer, vae, vae_params, scheduler)."""
  rng = jax.random.PRNGKey(seed)
  r_unet, r_text, r_vae = jax.random.split(rng, 3)
  unet = FlaxUNet2DConditionModel(
      sample_size=spec.sample_size, in_channels=spec.in_channels, out_channels=spec.in_channels,
      down_block_types=spec.down_block_types, up_block_types=spec.up_block_types,
      block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
      attention_head_dim=spec.num_heads, cross_attention_dim=spec.text_width)
  unet_params = unet.init_weights(r_unet)
  tokenizer = build_word_tokenizer(spec.words, spec.max_length)
  text_config = CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=2 * spec.text_width,
      num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
      max_position_embeddings=spec.max_length, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  text_encoder = FlaxCLIPTextModel(text_config, seed=int(jax.random.randint(r_text, (), 0, 2**30)))
  vae = vae_params = None
  if spec.vae:
    n = len(spec.vae_channels)
    vae = FlaxAutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels, layers_per_block=1,
        sample_size=spec.sample_size * 2 ** (n - 1))
    vae_params = vae.init_weights(r_vae)
  # SD v1.x's schedule: scaled-linear betas 0.00085..0.012, 1000 steps.
  scheduler = FlaxDDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
  return unet, unet_params, text_encoder, tokenizer, vae, vae_params, scheduler


def save_pipeline(path: str, unet, unet_params, text_encoder, text_params, tokenizer, scheduler,
                  vae=None, vae_params=None, fmt: str = "flax") -> str:
  """Writes a diffusers-format pipeline directory.

  ``fmt``: 'flax' (msgpack), 'pt' (PyTorch .bin for diffusers models,
  safetensors for the text encoder: what diffusers/transformers write by
  default) or 'safetensors' (PyTorch weights as safetensors everywhere). The
  PyTorch formats convert through the PyTorch classes (``from_flax``), which
  needs torch.
  Written to ``path + '.tmp'`` first and renamed, so a crash leaves no
  half-written pipeline.
  """
  if fmt not in ("flax", "pt", "safetensors"):
    raise ValueError(f"unknown weights format {fmt!r}; expected 'flax', 'pt' or 'safetensors'")
  path = os.path.abspath(path)
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  to_np = lambda p: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), p)
  unet.save_pretrained(os.path.join(tmp, "unet"), params=to_np(unet_params))
  text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"), params=to_np(text_params))
  if vae is not None:
    vae.save_pretrained(os.path.join(tmp, "vae"), params=to_np(vae_params))
  tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
  scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
  if fmt != "flax":
    torch_export.convert_to_pytorch(tmp, safetensors=(fmt == "safetensors"))
  with open(os.path.join(tmp, "model_index.json"), "w") as f:
    json.dump({"_class_name": "FlaxStableDiffusionPipeline",
               "_diffusers_version": models.diffusers.__version__,
               "unet": ["diffusers", "FlaxUNet2DConditionModel"],
               "text_encoder": ["transformers", "FlaxCLIPTextModel"],
               "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
               "scheduler": ["diffusers", "FlaxDDIMScheduler"],
               **({"vae": ["diffusers", "FlaxAutoencoderKL"]} if vae is not None else {})}, f, indent=2)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
  return path


def write_tiny_pipeline(path: str, spec: TinySpec = TinySpec(), seed: int = 0, fmt: str = "flax") -> str:
  """Writes a small randomly initialised SD-like pipeline to ``path``."""
  unet, unet_params, te, tok, vae, vae_params, sched = tiny_components(spec, seed)
  return save_pipeline(path, unet, unet_params, te, te.params, tok, sched, vae, vae_params, fmt=fmt)


def write_tiny_configs(path: str, spec: TinySpec = TinySpec()) -> str:
  """The config files (and tokenizer) of ``write_tiny_pipeline``'s pipeline, no
  weights: what a dry run (abstract loading) reads. Seconds, not a minute."""
  tokenizer = build_word_tokenizer(spec.words, spec.max_length)
  n = len(spec.vae_channels)
  unet = FlaxUNet2DConditionModel(
      sample_size=spec.sample_size, in_channels=spec.in_channels, out_channels=spec.in_channels,
      down_block_types=spec.down_block_types, up_block_types=spec.up_block_types,
      block_out_channels=spec.block_out_channels, layers_per_block=spec.layers_per_block,
      attention_head_dim=spec.num_heads, cross_attention_dim=spec.text_width)
  unet.save_config(os.path.join(path, "unet"))
  CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=2 * spec.text_width,
      num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
      max_position_embeddings=spec.max_length, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
  ).save_pretrained(os.path.join(path, "text_encoder"))
  if spec.vae:
    FlaxAutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels, layers_per_block=1,
        sample_size=spec.sample_size * 2 ** (n - 1)).save_config(os.path.join(path, "vae"))
  tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
  FlaxDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1,
                    num_train_timesteps=1000).save_pretrained(os.path.join(path, "scheduler"))
  return path


# ------------------------------------------------- timm ViT image classifiers
