"""Stable Diffusion v1.5 (or the UnlearnCanvas fine-tune) at the papers' settings.

Needs a local diffusers-format SD v1.5 directory (Flax or PyTorch weights;
PyTorch needs `pip install torch`). Nothing is downloaded:

  python -m saemnesia_jax.sample --config configs/sd15.py \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.prompts="('A Dogs image in Van_Gogh style.',)"

Settings of METHOD.md section 1: block ``up_blocks.1.attentions.1`` (output
(16, 16, 1280) at 512x512: 256 tokens of d_in 1280), DDIM eta 0, 50 steps for
collection (100 for evaluation), CFG 9.0, seeds of UnlearnCanvas.
On one GPU expect seconds per image; on a 2-core CPU, minutes.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.workdir = "runs/sd15"
  config.model = ml_collections.ConfigDict(dict(
      path="/path/to/stable-diffusion-v1-5",
      dtype="bfloat16",
      weights="auto",
      seed=0,
  ))
  config.block = "up_blocks.1.attentions.1"
  config.sampler = ml_collections.ConfigDict(dict(
      num_steps=50,
      guidance_scale=9.0,
      height=512,
      width=512,
      batch_size=8,
  ))
  config.prompts = ("A Dogs image in Van_Gogh style.",)
  config.seeds = (188, 288, 588, 688, 888)
  return config
