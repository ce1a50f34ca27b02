"""SAEmnesia on CanvasMini: the supervised fine-tune of the unsupervised SAE of
configs/canvas_mini.py (run that one's collect, train and scores first):

  python -m saemnesia_jax.train  --config configs/canvas_mini_sup.py
  python -m saemnesia_jax.scores --config configs/canvas_mini_sup.py

It reads {workdir}/sae_unsup/export and the greedy assignment in
{workdir}/sae_unsup/scores, and writes {workdir}/sae_sup/ and
{workdir}/sae_sup/scores. The published recipe (METHOD.md section 3) is sigmoid BCE, Adam 5e-6, 128
maps per batch, up to 150 epochs with early stopping (patience 5): on SD's
store that is hours of GPU time. The miniature's store holds 13,000 maps of
64 tokens; here the fine-tune takes 32 maps (2,048 tokens) per batch and at
most 2,000 steps (about 6 epochs of the 80% train split), with the same early
stopping, so that it finishes in minutes on 2 CPU cores.

It uses the softmax cross-entropy option with Adam 1e-3, chosen by measuring
the association report (scores stage) of three fine-tunes of the same SAE:

  loss, Adam     assigned share (objects / styles)  assigned is best
  BCE, 1e-4      0.007 / 0.032                      0/10, 1/10
  softmax, 1e-4  0.005 / 0.171                      0/10, 6/10
  softmax, 1e-3  0.035 / 0.215                      0/10, 6/10
  (unsupervised SAE: best latent's share 0.081 / 0.168)

With BCE the assigned latents die: the logits are post-ReLU map means of a
few units (the loss starts near 5 per concept), every map is a negative for
18 of the 20 assigned latents and a negative's gradient is at least 0.5, so
each assigned latent is pushed below zero everywhere and then gets no
gradient. Objects are not concentrated by any variant (see the README).
"""
import ml_collections

from saemnesia_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  base = config_defaults.sibling_config(__file__, "canvas_mini.py")
  base.sae.sup_loss = "softmax"
  return config_defaults.make_supervised(
      base, steps=2000, batch_size=32, learning_rate=1e-3, lr_decay="constant", adam_eps=1e-8,
      eval_every=100)
