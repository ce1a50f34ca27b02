"""Tiny random SD-like pipeline on the CPU: the smoke test of every stage.

Runs in about a minute on 2 CPU cores:

  python -m saemnesia_jax.sample --config configs/tiny.py

With ``model.path = ''`` a random three-level SD-like pipeline (cross-attention
down and up blocks, a tiny VAE, a 2-layer CLIP text encoder and a word-level
tokenizer) is written to ``{workdir}/tiny_pipeline`` the first time. Its
samples are noise-like images: the point is the machinery, not the pictures.
The hooked block ``up_blocks.1.attentions.1`` has output (8, 8, 64) at 32x32.
"""
import ml_collections

from saemnesia_jax.runtime import config_defaults


def get_config():
  config = ml_collections.ConfigDict()
  config.workdir = "runs/tiny"
  config.model = ml_collections.ConfigDict(dict(
      path="",  # '' -> write (once) and use a tiny random pipeline in workdir
      dtype="float32",  # float32 | bfloat16 | float16
      weights="auto",  # auto (Flax if present, else PyTorch) | flax | pt
      seed=0,  # seed of the tiny random pipeline
      attention="auto",
  ))
  config.block = "up_blocks.1.attentions.1"
  config.sampler = ml_collections.ConfigDict(dict(
      num_steps=20,
      guidance_scale=9.0,
      height=0,  # pixels; 0 -> the model's default size
      width=0,
      batch_size=4,
  ))
  config.prompts = (
      "A cat image in neon style.",
      "A dog image in pastel style.",
  )
  config.seeds = (188, 288, 588)
  # The concepts of the prompt grid (collect, scores, evaluate).
  config.concepts = ml_collections.ConfigDict(dict(
      objects=("cat", "dog"),
      styles=("neon", "pastel"),
      style_template="A {object} image in {style} style.",
      anchor_templates=("A {object} image.",),
  ))
  config_defaults.add_stage_sections(
      config,
      collect=dict(seeds=(1, 2), allow_eval_overlap=True),  # a smoke test: seed 1 is also the sweep's
      sae=dict(expansion_factor=4, k=8, dead_tokens=10_000),
      train=dict(steps=40, batch_size=256, learning_rate=1e-3, val_batches=4, eval_every=20,
                 log_every=10, ckpt_every=20),
      evaluate=dict(gammas=(-1.0, -10.0), percentiles=(99.0,), eval_seeds=(188,)),
      # The supervised fine-tune of the pipeline: the tiny store holds few maps per batch.
      pipeline=dict(sup_train=dict(batch_size=4)),
  )
  return config
