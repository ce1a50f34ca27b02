"""SAEmnesia on Stable Diffusion v1.5 / UnlearnCanvas: the supervised fine-tune
of configs/sd15.py's unsupervised SAE at the published recipe (docs/method.md
section 3): Adam 5e-6, 128 maps per batch, up to 150 epochs with early
stopping (patience 5) on a 20% validation split. The epochs are those of the
store actually collected: the trainer derives the steps from it (train.epochs)
and prints them. With sd15's two blocks, each block's SAE is fine-tuned on its
own store from its own greedy assignment.

  python -m saemnesia_jax.train  --config configs/sd15_sup.py --config.model.path=...
  python -m saemnesia_jax.scores --config configs/sd15_sup.py --config.model.path=...
"""
import ml_collections

from saemnesia_jax.runtime import config_defaults


def get_config() -> ml_collections.ConfigDict:
  # The recipe is sd15.py's pipeline section (pipeline.sup_train), so that this file and
  # `python -m saemnesia_jax.pipeline --config configs/sd15.py` run the same fine-tune.
  return config_defaults.supervised_of(config_defaults.sibling_config(__file__, "sd15.py"))
