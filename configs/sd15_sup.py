"""SAEmnesia on Stable Diffusion v1.5 / UnlearnCanvas: the supervised fine-tune
of configs/sd15.py's unsupervised SAE at the published recipe (METHOD.md
section 3): Adam 5e-6, 128 maps per batch, up to 150 epochs with early
stopping (patience 5) on a 20% validation split.

  python -m saemnesia_jax.train  --config configs/sd15_sup.py --config.model.path=...
  python -m saemnesia_jax.scores --config configs/sd15_sup.py --config.model.path=...
"""
import ml_collections

from saemnesia_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  # 150 epochs of the 80% train split: 83,200 prompts x 50 steps x 0.8 / 128 maps.
  base = config_defaults.sibling_config(__file__, "sd15.py")
  return config_defaults.make_supervised(
      base, steps=150 * 83_200 * 50 * 8 // 10 // 128, batch_size=128, learning_rate=5e-6,
      lr_decay="constant", adam_eps=1e-8, eval_every=1000, patience=5,
      micro_batches=8)  # 128 maps in 8 slices: 1.4 GiB of step temporaries instead of 12.7 (the same update)
