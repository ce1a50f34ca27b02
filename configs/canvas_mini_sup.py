"""SAEmnesia on CanvasMini: the supervised fine-tune of the unsupervised SAE of
configs/canvas_mini.py (run that one's collect, train and scores first):

  python -m saemnesia_jax.train  --config configs/canvas_mini_sup.py
  python -m saemnesia_jax.scores --config configs/canvas_mini_sup.py

It reads {workdir}/sae_unsup/export and the greedy assignment in
{workdir}/sae_unsup/scores, and writes {workdir}/sae_sup/ and
{workdir}/sae_sup/scores. The published recipe (docs/method.md section 3) is sigmoid BCE, Adam 5e-6, 128
maps per batch, up to 150 epochs with early stopping (patience 5): on SD's
store that is hours of GPU time. The miniature's store holds 13,000 maps of
16 tokens; here the fine-tune takes 32 maps (512 tokens) per batch and at
most 2,000 steps (about 6 epochs of the 80% train split), with the same early
stopping, so that it finishes in 25 s on 2 CPU cores.

It uses the softmax cross-entropy option with Adam 1e-3, chosen by measuring
the association report (scores stage) of four fine-tunes of the same SAE at
the hooked block, mid_block.attentions.0 (configs/canvas_mini.py):

  loss, Adam     assigned share (objects / styles)  assigned is best
  softmax, 1e-3  0.375 / 0.337                      10/10, 10/10
  softmax, 1e-4  0.300 / 0.229                       9/10, 10/10
  BCE, 1e-3      0.053 / 0.066                       2/10,  3/10
  BCE, 1e-4      0.053 / 0.067                       1/10,  2/10
  (unsupervised SAE: best latent's share 0.243 / 0.153)

BCE fails here although the assigned latents do tell the concepts apart
(object accuracy 1.0 on training batches at 1e-3): its logits are post-ReLU
map means, so a negative's loss never drops below log 2 and every negative
(18 of the 20 assigned latents on every map) pushes its latent to zero, while
a positive's gradient vanishes once its logit passes a few units. The
assigned latents end up small beside the latents that carry the concept's
mass; the softmax has neither floor nor ceiling.
"""
import ml_collections

from saemnesia_jax.runtime import config_defaults


def get_config() -> ml_collections.ConfigDict:
  # The recipe is canvas_mini.py's pipeline section (sup_loss, sup_train), so
  # that this file and `python -m saemnesia_jax.pipeline` run the same fine-tune.
  return config_defaults.supervised_of(config_defaults.sibling_config(__file__, "canvas_mini.py"))
