"""What every stage shares: loading the model a config names, building its
sampler, and recording the config that produced an output. (The command
line itself is ``runtime/cli.py``.)"""
from __future__ import annotations

import os
import shutil

import ml_collections

from saemnesia_jax.diffusion import models, tiny
from saemnesia_jax.diffusion.sampler import EditFn, Sampler, SamplerSpec
from saemnesia_jax.runtime import layout

_WEIGHTS = {"auto": None, "flax": False, "pt": True}


def ensure_model(config: ml_collections.ConfigDict) -> str:
  """The pipeline directory of ``config.model`` (``layout.model_dir``), made
  usable: model.path='' writes the tiny random pipeline into the workdir on
  first use; the shipped CanvasMini model must have been built."""
  path = layout.model_dir(config)
  if config.model.path == "canvas_mini" and not os.path.isdir(path):
    raise models.ModelLoadError(
        f"the CanvasMini pipeline is not built ({path} is missing): run "
        "`python -m saemnesia_jax.canvas_mini.build --config configs/canvas_mini.py`")
  if not config.model.path and not os.path.isdir(path):
    print(f"writing a tiny random SD-like pipeline to {path} (first use only; about a minute)", flush=True)
    tiny.write_tiny_pipeline(path, seed=config.model.seed)
  return path


def from_pt(config: ml_collections.ConfigDict) -> bool | None:
  if config.model.weights not in _WEIGHTS:
    raise ValueError(f"config.model.weights={config.model.weights!r}; expected one of {sorted(_WEIGHTS)}")
  return _WEIGHTS[config.model.weights]


def load_model(config: ml_collections.ConfigDict, abstract: bool = False) -> models.Pipeline:
  """The pipeline of ``config.model`` (see ``ensure_model``); ``abstract``: its
  parameters as shapes from the config files alone (dry runs: no weights read)."""
  if abstract:
    return models.load_pipeline(config_dir(config), dtype=config.model.dtype, from_pt=from_pt(config),
                                attention=config.model.get("attention", "auto"), abstract=True)
  path = ensure_model(config)
  print(f"loading the model {path} ({config.model.dtype})", flush=True)
  return models.load_pipeline(path, dtype=config.model.dtype, from_pt=from_pt(config),
                              attention=config.model.get("attention", "auto"))


def config_dir(config: ml_collections.ConfigDict, print_fn=print) -> str:
  """The folder a dry run reads the model's config files from (``layout.model_config_dir``):
  the tiny pipeline's are written there first; SD v1.5's shipped ones are announced."""
  path = layout.model_config_dir(config)
  if not config.model.path and not os.path.isdir(path):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.replace(tiny.write_tiny_configs(tmp), path)
  if path == layout.SD15_CONFIGS and layout.model_dir(config) != path:
    print_fn(f"dry run: {layout.model_dir(config)} holds no unet/config.json: sizing SD v1.5's architecture "
             f"({path}); set --config.model.path to size another model")
  return path


def make_sampler(config: ml_collections.ConfigDict, pipe: models.Pipeline, capture: bool = False,
                 edit_fn: EditFn | None = None) -> Sampler:
  """The sampler of ``config.sampler``, capturing and/or editing ``config.block``."""
  s = config.sampler
  spec = SamplerSpec(num_steps=s.num_steps, height=s.height or None, width=s.width or None,
                     batch_size=s.batch_size, capture_block=config.block if capture else None,
                     edit_block=config.block if edit_fn is not None else None)
  return Sampler(pipe, spec, edit_fn)


def config_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-able data, for manifests."""
  return config.to_dict()
