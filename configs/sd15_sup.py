"""SAEmnesia on Stable Diffusion v1.5 / UnlearnCanvas: the supervised fine-tune
of configs/sd15.py's unsupervised SAE at the published recipe (METHOD.md
section 3): Adam 5e-6, 128 maps per batch, up to 150 epochs with early
stopping (patience 5) on a 20% validation split. The epochs are those of the
store actually collected: the trainer derives the steps from it (train.epochs)
and prints them. With sd15's two blocks, each block's SAE is fine-tuned on its
own store from its own greedy assignment.

  python -m saemnesia_jax.train  --config configs/sd15_sup.py --config.model.path=...
  python -m saemnesia_jax.scores --config configs/sd15_sup.py --config.model.path=...
"""
import ml_collections

from saemnesia_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  # 150 epochs of the 80% train split of the store actually collected: the
  # trainer derives the steps from the store (train.epochs) and prints them.
  base = config_defaults.sibling_config(__file__, "sd15.py")
  return config_defaults.make_supervised(
      base, epochs=150.0, batch_size=128, learning_rate=5e-6, lr_decay="constant", adam_eps=1e-8,
      eval_every=1000, patience=5, early_stop=True,
      micro_batches=8)  # 128 maps in 8 slices: 1.4 GiB of step temporaries instead of 12.7 (the same update)
