"""What every stage's entry point shares: loading the model a config names,
and recording the config that produced an output."""
from __future__ import annotations

import os

import ml_collections

from saemnesia_jax import models

_WEIGHTS = {"auto": None, "flax": False, "pt": True}


def load_model(config: ml_collections.ConfigDict) -> models.Pipeline:
  """The pipeline of ``config.model``; path '' writes (once) a tiny random one."""
  m = config.model
  if m.weights not in _WEIGHTS:
    raise ValueError(f"config.model.weights={m.weights!r}; expected one of {sorted(_WEIGHTS)}")
  path = m.path
  if not path:
    path = os.path.join(config.workdir, "tiny_pipeline")
    if not os.path.isdir(path):
      models.write_tiny_pipeline(path, seed=m.seed)
  return models.load_pipeline(path, dtype=m.dtype, from_pt=_WEIGHTS[m.weights])


def config_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-able data, for manifests."""
  return config.to_dict()
