"""The shipped CanvasMini base model: loads through the model layer and draws its concepts."""
import json
import os
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.evaluation import concepts
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax.canvas_mini import PIPELINE_DIR, classifiers, data
from saemnesia_jax.diffusion.sampler import sample_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import canvas_mini  # noqa: E402


@pytest.fixture(scope="module")
def config():
  c = canvas_mini.get_config()
  c.sampler.batch_size = 110
  return c


def test_shipped_model_draws_every_concept(config):
  pipe = common.load_model(config)  # the ordinary model layer, as for any SD checkpoint
  assert pipe.path == os.path.abspath(PIPELINE_DIR) and pipe.vae is None
  sampler = common.make_sampler(config, pipe, capture=True)
  # The hooked block of the config (mid_block.attentions.0): 4 x 4 tokens of d_in 64.
  assert sampler.block_output_shape() == (4, 4, 64)
  grid = [p for p in concepts.prompt_grid(config.concepts) if p.variant == 0]  # 100 styled + 10 plain
  assert len(grid) == data.N_OBJECTS * data.N_STYLE_CLASSES
  imgs = sample_prompts(sampler, [p.prompt for p in grid], [188] * len(grid),
                        config.sampler.guidance_scale, progress=False)
  po, ps = classifiers.predict(classifiers.load_classifiers(), imgs)
  obj = np.array([p.object_id for p in grid])
  sty = np.array([data.NO_STYLE_ID if p.style_id < 0 else p.style_id for p in grid])
  # Issue 3's bar: objects 90%, styles 85% (the build measured 100% / 98.4%
  # over five seeds at the shipped guidance scale).
  assert np.mean(po == obj) >= 0.90, f"object accuracy {np.mean(po == obj):.3f}"
  assert np.mean(ps == sty) >= 0.85, f"style accuracy {np.mean(ps == sty):.3f}"


def test_build_report_records_the_evaluation():
  report = json.load(open(os.path.join(PIPELINE_DIR, "canvas_mini.json")))
  best = next(r for r in report["evaluations"] if r["guidance_scale"] == report["chosen_guidance_scale"])
  assert best["n"] == 550  # every object x style-class pair, five seeds
  assert best["object_accuracy"] >= 0.90 and min(best["object_per_class"].values()) >= 0.75
  assert best["style_accuracy"] >= 0.85 and min(best["style_per_class"].values()) >= 0.75
  assert set(best["style_per_class"]) == set(data.STYLE_CLASSES)
  assert set(best["object_per_class"]) == set(data.OBJECTS)


def test_pytorch_export_round_trips_every_parameter_and_image(config, tmp_path):
  """CanvasMini (with the pooled-text ``text_time`` add_embedding) exported to
  PyTorch safetensors and read back: every parameter and every image equal."""
  pipe = common.load_model(config)
  out = tiny_lib.save_pipeline(str(tmp_path / "pt"), pipe.unet, pipe.params["unet"], pipe.text_encoder,
                             pipe.params["text_encoder"], pipe.tokenizer, pipe.scheduler, fmt="safetensors")
  back = models.load_pipeline(out, from_pt=True)
  flat = lambda p: {"/".join(map(str, k)): np.asarray(v) for k, v in flatten_dict(p).items()}
  for part in ("unet", "text_encoder"):
    a, b = flat(pipe.params[part]), flat(back.params[part])
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}/{k}")
  config = config.copy_and_resolve_references()
  config.sampler.batch_size, config.sampler.num_steps = 4, 5
  prompts = ["A Disk image in Neon style.", "A Plus image in Comic style.", "A Ring image.", "A Tee image."]
  imgs = [sample_prompts(common.make_sampler(config, p), prompts, [188] * 4, config.sampler.guidance_scale,
                         progress=False) for p in (pipe, back)]
  np.testing.assert_array_equal(imgs[0], imgs[1])
