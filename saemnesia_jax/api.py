"""The Python API: load a pipeline, an SAE and its scores, and sample with
concepts erased (the unlearn stage is a thin wrapper over it).

  from saemnesia_jax import api
  pipe = api.load_pipeline("canvas_mini")            # or a diffusers SD v1.x directory
  sae = api.load_sae(api.SHIPPED["saemnesia"])       # sparsify layout: cfg.json + sae.safetensors
  tables = api.load_scores(api.shipped_scores("saemnesia"))
  er = api.erasure(sae, tables, ["Disk"], "saemnesia", gamma=-2.0)
  prompts, seeds = ["A Disk image in Neon style.", "A Ring image in Comic style."], [188, 188]
  before = api.sample(pipe, prompts, seeds, guidance_scale=1.5)              # (2, 16, 16, 3) in [0, 1]
  after = api.sample(pipe, prompts, seeds, erase=er, guidance_scale=1.5)
  pil = api.to_pil(after)                                                       # PIL images

``erasure(...)`` without ``gamma`` takes each concept's setting from
``chosen`` (the evaluate stage's choice; the shipped CanvasMini SAEs come
with theirs). An erasure of no concepts is the identity edit: sampling with
it gives the same images as without an SAE, through the same compiled sampler.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image

from saemnesia_jax.canvas_mini import ASSET_DIR, PIPELINE_DIR
from saemnesia_jax.diffusion import clamp
from saemnesia_jax.diffusion import erase as erase_lib
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec, sample_prompts
from saemnesia_jax.evaluation import images as img_utils
from saemnesia_jax.evaluation import variants
from saemnesia_jax.runtime import layout
from saemnesia_jax.runtime.io_utils import read_json
from saemnesia_jax.sae import artifacts

# The SAEs shipped with the CanvasMini model (sparsify layout), their scores and chosen settings.
SHIPPED = {m: layout.sae_export(ASSET_DIR, run) for m, run in layout.RUN_OF_METHOD.items()}
SHIPPED_CHOSEN = os.path.join(ASSET_DIR, "chosen.json")


def shipped_scores(method: str) -> str:
  """The scores folder of the shipped CanvasMini SAE of ``method``."""
  return layout.sae_scores(ASSET_DIR, layout.RUN_OF_METHOD[method])


class SAE(NamedTuple):
  params: dict  # W_enc, b_enc, W_dec, b_dec as float32 numpy arrays
  k: int  # per-token TopK of the clamp
  block: str | None  # the block it was trained on (saemnesia.json), None if unknown
  path: str
  assignment: np.ndarray | None = None  # SAEmnesia: the concept -> latent ids it was trained with


class Erasure(NamedTuple):
  """What to erase: the clamp entries of some concepts on one SAE."""
  sae: SAE
  entries: tuple  # clamp.Entry per concept
  score_timesteps: np.ndarray  # the timesteps the scores were collected at
  concepts: tuple  # (domain, name, setting) per concept
  method: str


def load_pipeline(path_or_config: Any, dtype: str = "float32"):
  """A ``models.Pipeline`` from a directory, 'canvas_mini' (the shipped model)
  or a config (its ``model`` section)."""
  if isinstance(path_or_config, str):
    if path_or_config == "canvas_mini":
      path_or_config = PIPELINE_DIR
    return models.load_pipeline(path_or_config, dtype=dtype)
  return common.load_model(path_or_config)


def load_sae(path: str, field: str = "") -> SAE:
  """An SAE folder in sparsify's layout (cfg.json + sae.safetensors [+ saemnesia.json]);
  ``field``: the config field an error tells the user to set."""
  params, cfg, meta = artifacts.load_sae(path, field=field or "the SAE folder")
  trained = (meta or {}).get("assignment")
  return SAE({k: np.asarray(v, np.float32) for k, v in params.items()}, int(cfg["k"]),
             (meta or {}).get("block"), path, None if trained is None else np.asarray(trained, np.int32))


def load_scores(path: str) -> dict[str, np.ndarray]:
  """The arrays of a scores folder (scores.npz: mu, thresholds, importance scores,
  timesteps, assignment, concept names)."""
  return artifacts.load_scores(path)


def load_chosen(path: str) -> dict[str, dict]:
  """Chosen settings {'method/domain/concept': {'gamma': ..[, 'percentile': ..]}} from
  chosen.json or the evaluate stage's summary.json (each method at the row its
  rule choice picked, where the evaluation chose one: ``evaluate.rule_seeds``)."""
  data = read_json(path)
  return variants.headline_choices(data) if isinstance(data, dict) else {}


def concept_names(tables: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
  """(objects, styles) the scores were computed for."""
  return [str(n) for n in tables["objects"]], [str(n) for n in tables["styles"]]


def erasure(sae: SAE, tables: Mapping[str, np.ndarray], concepts: Sequence[str], method: str = "saemnesia",
            gamma: float | None = None, percentile: float | None = None,
            chosen: Mapping[str, Mapping[str, float]] | None = None) -> Erasure:
  """Erases ``concepts`` (object and/or style names of the scores) with ``method``.

  Each concept's setting is ``chosen[method/domain/name]`` with ``gamma`` /
  ``percentile`` overriding it where given; a concept with neither needs them.
  """
  if method not in erase_lib.METHODS:
    raise ValueError(f"method={method!r}: known methods are {erase_lib.METHODS}")
  objects, styles = concept_names(tables)
  entries, named = [], []
  for c in concepts:
    domain, index, name = erase_lib.find_concept(c, objects, styles)
    setting = dict((chosen or {}).get(erase_lib.setting_key(method, domain, name), {}))
    if gamma is not None:
      setting["gamma"] = float(gamma)
    if percentile is not None and method == "saeuron":
      setting["percentile"] = float(percentile)
    missing = [f for f in (("gamma",) if method == "saemnesia" else ("gamma", "percentile")) if f not in setting]
    if missing:
      raise ValueError(f"no chosen {'/'.join(missing)} for {method} / {name}: give them "
                       f"(e.g. --config.unlearn.gamma=-2.0) or the evaluate stage's summary.json as chosen")
    entries.append(erase_lib.concept_entry(method, tables, domain, index, setting, assignment=sae.assignment))
    named.append((domain, name, setting))
  return Erasure(sae, tuple(entries), np.asarray(tables["timesteps"]), tuple(named), method)


def to_pil(images: np.ndarray, scale: int = 1) -> list:
  """(N, H, W, 3) images in [0, 1] -> PIL images (nearest-upscaled by ``scale``)."""
  out = []
  for im in img_utils.to_uint8(images):
    p = Image.fromarray(im)
    out.append(p.resize((p.width * scale, p.height * scale), Image.NEAREST) if scale > 1 else p)
  return out


_SAMPLERS: dict = {}


def _sampler(pipe, num_steps: int, height: int, width: int, batch_size: int, block: str | None, k: int):
  """One compiled sampler per (pipeline, shape, block, k), kept for later calls."""
  key = (id(pipe), num_steps, height, width, batch_size, block, k)
  if key not in _SAMPLERS:
    spec = SamplerSpec(num_steps=num_steps, height=height or None, width=width or None, batch_size=batch_size,
                       edit_block=block)
    _SAMPLERS[key] = (pipe, Sampler(pipe, spec, clamp.make_edit_fn(k) if block else None))
  return _SAMPLERS[key][1]


def sample(pipe, prompts: Sequence[str], seeds: Sequence[int], erase: Erasure | None = None, *,
           guidance_scale: float = 7.5, num_steps: int = 25, batch_size: int = 8, height: int = 0,
           width: int = 0, block: str | None = None, max_latents: int = 0, pil: bool = False,
           progress: bool = False):
  """Samples one image per (prompt, seed) pair, with ``erase``'s concepts erased.

  Returns (N, H, W, 3) float32 arrays in [0, 1], or PIL images with ``pil``.
  ``block`` defaults to the one the erasure's SAE was trained on;
  ``max_latents`` (0: the smallest power of two >= 8 that holds them) sizes
  the clamp: erasures of one size share one compiled sampler.
  """
  if erase is None:
    s = _sampler(pipe, num_steps, height, width, batch_size, None, 0)
    imgs = sample_prompts(s, list(prompts), list(seeds), guidance_scale, progress=progress)
  else:
    block = block or erase.sae.block
    if not block:
      raise ValueError(f"{erase.sae.path} does not say which block it was trained on (no saemnesia.json): "
                       "pass block=, e.g. 'up_blocks.1.attentions.1'")
    s = _sampler(pipe, num_steps, height, width, batch_size, block, erase.sae.k)
    spec = clamp.build_spec(list(erase.entries), s.timesteps, erase.score_timesteps,
                            max_latents or erase_lib.spec_size(erase.entries))
    imgs = sample_prompts(s, list(prompts), list(seeds), guidance_scale, edit_params=(erase.sae.params, spec),
                          progress=progress)
  return to_pil(imgs) if pil else imgs
