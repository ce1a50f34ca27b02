"""SAEmnesia on CanvasMini: the supervised fine-tune of the unsupervised SAE of
configs/canvas_mini.py (run that one's collect, train and scores first):

  python -m saemnesia_jax.train  --config configs/canvas_mini_sup.py
  python -m saemnesia_jax.scores --config configs/canvas_mini_sup.py

It reads {workdir}/sae_unsup/export and the greedy assignment in
{workdir}/sae_unsup/scores, and writes {workdir}/sae_sup/ and
{workdir}/sae_sup/scores. The published recipe (METHOD.md section 3) is Adam
5e-6, 128 maps per batch, up to 150 epochs with early stopping (patience 5):
on SD's store that is hours of GPU time. The miniature's store holds 13,000
maps of 64 tokens; here the fine-tune takes 32 maps (2,048 tokens) per batch,
Adam 1e-4 and at most 2,000 steps (about 6 epochs of the 80% train split),
with the same early stopping, so that it finishes in minutes on 2 CPU cores.
"""
import importlib.util
import os

import ml_collections

from saemnesia_jax import config_defaults


def _base():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "canvas_mini.py")
  spec = importlib.util.spec_from_file_location("canvas_mini_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  return config_defaults.make_supervised(
      _base(), steps=2000, batch_size=32, learning_rate=1e-4, lr_decay="constant", adam_eps=1e-8,
      eval_every=100)
