"""The `sample` stage's entry point: config file + overrides -> PNGs, grid, manifest."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(workdir):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny
  config = tiny.get_config()
  config.workdir = str(workdir)
  config.sampler.num_steps = 2
  config.sampler.batch_size = 2
  config.seeds = (1, 2)
  return config


def test_run_writes_images_grid_and_manifest(tmp_path):
  from saemnesia_jax import sample
  manifest = sample.run(_tiny_config(tmp_path))
  out = tmp_path / "samples"
  pngs = sorted(p for p in os.listdir(out) if p.endswith(".png") and p != "grid.png")
  assert pngs == ["0000_seed1.png", "0000_seed2.png", "0001_seed1.png", "0001_seed2.png"]
  img = Image.open(out / "0000_seed1.png")
  assert img.size == (128, 128) and img.mode == "RGB"  # 32x32 upscaled 4x for viewing
  assert Image.open(out / "grid.png").size[0] > 2 * 128
  saved = json.loads((out / "manifest.json").read_text())
  assert saved["n_images"] == 4 == manifest["n_images"]
  assert saved["config"]["sampler"]["num_steps"] == 2


def test_config_typo_is_an_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "saemnesia_jax.sample", "--config", os.path.join(ROOT, "configs/tiny.py"),
       f"--config.workdir={tmp_path}", "--config.sampler.num_stepz=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "num_stepz" in proc.stderr
  assert not (tmp_path / "samples").exists()


def test_empty_prompts_are_an_error(tmp_path):
  from saemnesia_jax import sample
  config = _tiny_config(tmp_path)
  config.prompts = ()
  with pytest.raises(ValueError, match="config.prompts is empty"):
    sample.run(config)
