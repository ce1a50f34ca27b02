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

The SAE stages at the published recipes (METHOD.md sections 2-3):

  python -m saemnesia_jax.collect --config configs/sd15.py --config.model.path=...
  python -m saemnesia_jax.train   --config configs/sd15.py --config.model.path=...   # SAeUron
  python -m saemnesia_jax.scores  --config configs/sd15.py --config.model.path=...
  python -m saemnesia_jax.train   --config configs/sd15.py --config.model.path=... \
      --config.sae.mode=supervised --config.sae.init_from=runs/sd15/sae_unsup/export \
      --config.train.name=sae_sup --config.train.learning_rate=5e-6 --config.train.batch_size=128 \
      --config.train.lr_decay=constant --config.train.adam_eps=1e-8

SAeUron: d_in 1280, 20,480 latents (expansion 16), k 32, BatchTopK, Adam
4e-4 with linear decay, eps 6.25e-10, clip 1.0, 4,096 tokens per batch.
SAEmnesia: fine-tune of that SAE, Adam 5e-6, 128 maps per batch, early
stopping with patience 5 on a 20% validation split. configs/sd15_sup.py
holds that fine-tune's settings.

Evaluation judges with UnlearnCanvas' ViT-L classifiers (run in JAX, read with
torch): --config.evaluate.classifier_dir=<folder with style_classifier.pth and
object_classifier.pth>. The 50 style and 20 object names are the
classifiers' class names (saemnesia_jax/unlearncanvas.py, from the public
UnlearnCanvas evaluation code).
"""
import ml_collections

from saemnesia_jax import config_defaults, unlearncanvas


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
  config.concepts = ml_collections.ConfigDict(dict(
      objects=unlearncanvas.OBJECT_CLASSES,
      styles=unlearncanvas.STYLES,  # the 50 UnlearnCanvas styles (Seed_Images is the no-style class)
      style_template="A {object} image in {style} style.",
      anchor_templates=("A {object} image.",),
  ))
  config_defaults.add_stage_sections(
      config,
      collect=dict(seeds=(188,)),
      train=dict(steps=50_000, batch_size=4096, learning_rate=4e-4, mesh_shape=(-1, 1)),
      evaluate=dict(sequential_objects=("Bears", "Cats", "Flowers", "Frogs", "Jellyfish", "Sea",
                                        "Statues", "Sandwiches", "Waterfalls"),
                    classifier="unlearncanvas"),
      # SAEmnesia's fine-tune at the published recipe (configs/sd15_sup.py): 150 epochs of the
      # 80% train split (83,200 prompts x 50 steps x 0.8 / 128 maps), Adam 5e-6, early stopping.
      pipeline=dict(sup_train=dict(steps=150 * 83_200 * 50 * 8 // 10 // 128, batch_size=128,
                                   learning_rate=5e-6, lr_decay="constant", adam_eps=1e-8,
                                   eval_every=1000, patience=5)),
  )
  return config
