"""The dry run (--config.dry_run=True): its sizes are the real state's."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from saemnesia_jax.runtime import sizing
from saemnesia_jax import evaluate, train
from synthetic import BLOCK, make_concept_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402


def _device_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.mark.parametrize("mode", ["unsupervised", "supervised"])
def test_dry_run_bytes_match_the_real_state(tmp_path, mode):
  path = tmp_path / "acts"
  make_concept_store(path, seeds=4)
  c = tiny.get_config()
  c.workdir, c.block, c.collect.store_path = str(tmp_path), BLOCK, str(path)
  c.sae.expansion_factor, c.sae.k, c.sae.mode = 4, 4, mode
  c.train.update(dict(mesh_shape=(2, 2), batch_size=8))
  if mode == "supervised":
    c.sae.assignment = "random"
  lines = []
  shape = sizing.shape_record(c)
  out = sizing.train_dry_run(c, lambda cfg, devices: train.setup(cfg, shape, devices), print_fn=lines.append)
  tr = train.setup(c, train.open_training_store(c).shape)
  state = tr.init_fn(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
  dev = tr.mesh.devices.flat[0]
  pb = out["per_device_bytes"]
  assert pb["params"] == _device_bytes(state["params"], dev)
  assert pb["optimizer"] == _device_bytes(state["opt_state"], dev)
  # The latent axis is split over 'model' = 2: a device holds about half the parameters.
  full = sum(x.nbytes for x in jax.tree_util.tree_leaves(state["params"]))
  assert full / 2 <= pb["params"] < full
  assert pb["temporaries"] > 0 and out["tokens_per_step"] == (8 * 4 if mode == "supervised" else 8)
  assert any("per device" in l for l in lines)
  assert os.path.isfile(os.path.join(str(tmp_path), "dry_run", "train_sae_unsup.json"))


def test_block_shape_of_sd15():
  unet = {"block_out_channels": [320, 640, 1280, 1280]}
  assert sizing.block_shape(unet, 4, "up_blocks.1.attentions.1", 512) == (256, 1280)
  assert sizing.block_shape(unet, 4, "mid_block.attentions.0", 512) == (64, 1280)
  assert sizing.block_shape(unet, 4, "down_blocks.1.attentions.0", 512) == (1024, 640)


def test_micro_batches_must_divide_the_batch(tmp_path):
  path = tmp_path / "acts"
  make_concept_store(path, seeds=2)
  c = tiny.get_config()
  c.workdir, c.block, c.collect.store_path = str(tmp_path), BLOCK, str(path)
  c.sae.mode, c.sae.assignment = "supervised", "random"
  c.train.update(dict(batch_size=8, micro_batches=3))
  with pytest.raises(ValueError, match="micro_batches=3 must divide config.train.batch_size=8"):
    train.setup(c, sizing.shape_record(c))
  c.sae.mode = "unsupervised"
  with pytest.raises(ValueError, match="supervised step only"):
    train.setup(c, sizing.shape_record(c))


def test_sampler_dry_run_reads_no_weights_and_sizes_the_real_ones(tmp_path, stage="evaluate"):
  """Compile-only sizing of the sampling stages from config files alone: the
  weights it counts are the loaded pipeline's, and the compile is the real sampler's."""
  from saemnesia_jax.diffusion import models
  from saemnesia_jax.diffusion import tiny as tiny_lib
  model_dir = tiny_lib.write_tiny_pipeline(str(tmp_path / "tiny"), seed=0)
  c = tiny.get_config()
  c.workdir, c.model.path = str(tmp_path), model_dir
  c.sampler.update(dict(num_steps=2, batch_size=3))
  real = models.load_pipeline(model_dir)
  for f in models.weight_files(model_dir):
    os.rename(f, f + ".hidden")  # the dry run must not need them
  lines = []
  c.dry_run = True
  out = evaluate.dry_run(c, print_fn=lines.append)
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(real.params))
  assert out["per_device_bytes"]["weights"] == weights
  assert out["per_device_bytes"]["temporaries"] > 0 and out["xla_flops_per_call"] > 0
  assert out["batch_size"] == 3 and lines[0].startswith(f"dry run: {stage} sampler, 3 images")
  assert all(v > 0 for v in out["predicted_images_per_s"].values())
