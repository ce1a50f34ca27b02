"""Stable Diffusion v1.5 (or the UnlearnCanvas fine-tune) at the papers' settings.

Needs a local diffusers-format SD v1.5 directory (Flax or PyTorch weights;
PyTorch needs `pip install torch`). Nothing is downloaded:

  python -m saemnesia_jax.sample --config configs/sd15.py \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.prompts="('A Dogs image in Van Gogh style.',)"

The protocol (docs/method.md; SAeUron's and UnlearnCanvas' public code).
``protocol = "released"``: every protocol field left at '' / -1 takes what
the released code does (docs/method.md section 10: prompts, noise, style
CRA, JPEG, SAeUron's fixed style setting, SAEmnesia's percentile hook, the
kept error x_hat - x, float16); ``--config.protocol=project`` takes the
project's choices, and any single field can be set either way.

* Blocks: objects at ``up_blocks.1.attentions.1``, styles at
  ``up_blocks.1.attentions.2`` (``style_block``), output (16, 16, 1280) at
  512x512: 256 tokens of d_in 1280. Collect, train and scores run once per
  block into ``{workdir}/{block}/``; the evaluation clamps objects with the
  object block's SAE and styles with the style block's.
* Collection (SAeUron's): UnlearnCanvas' anchor prompts, the 80 lines of
  ``sd_prompt_<object>.txt`` per object (their repository:
  machine_unlearning/mu_concept_ablation_ca/anchor_prompts/finetune_prompts/;
  set ``collect.anchor_prompts_dir``), each "{line} in {style} style." for the
  50 styles, "{line} in Seed Images style." and "{line}.": 20 x 80 x 52 =
  83,200 prompts, one trajectory each (seed 10,000 + prompt index), DDIM 50
  steps, CFG 9.0, conditional half stored. None of them is an evaluation
  prompt and no seed is an evaluation seed, so the SAE, its importance
  scores and the supervision never see a judged image (collect refuses an
  overlap). Size per block: 4.16 M maps = 1.06 G tokens, 2.7 TB in
  bfloat16; ``collect.prompts_per_object=16`` takes a fifth. SAeUron computes its importance
  scores on a separate pass over anchor prompts at 100 steps and seed 188;
  here they come from this store (50 steps).
* SAeUron's SAE: 20,480 latents (expansion 16), k 32, BatchTopK, Adam 4e-4
  with linear decay, eps 6.25e-10, clip 1.0, 4,096 tokens per batch, 5 epochs
  of the store at the object block and 10 at the style block (steps derived
  from the store, printed), the full schedule (no early stop; the export is
  its end).
* SAEmnesia (configs/sd15_sup.py): the fine-tune of that SAE, Adam 5e-6,
  128 maps per batch, up to 150 epochs, early stopping with patience 5 on a
  20% validation split. The evaluation selects SAEmnesia's latents as its
  released sampler does, by the percentile hook on the supervised SAE's
  scores (``evaluate.saemnesia_selection``; ``assigned`` clamps the latent
  each concept was trained to carry).
* Evaluation (UnlearnCanvas): released, "An image of {object} in {style}
  style." with the style names written with spaces ("Van Gogh") and "An
  image of {object}." (project: the ``concepts`` templates below, "A {object}
  image in {style} style." and Seed_Images; the unstyled images count for
  object accuracy), DDIM 100
  steps (``evaluate.num_steps``), CFG 9.0, seeds 188, 288, 588, 688, 888;
  sequential unlearning up to the 9 objects of the paper.

On one GPU expect seconds per image; on a 2-core CPU, minutes.

  python -m saemnesia_jax.collect --config configs/sd15.py --config.model.path=... \
      --config.collect.anchor_prompts_dir=.../anchor_prompts/finetune_prompts
  python -m saemnesia_jax.train    --config configs/sd15.py --config.model.path=...   # SAeUron
  python -m saemnesia_jax.scores   --config configs/sd15.py --config.model.path=...
  python -m saemnesia_jax.train    --config configs/sd15_sup.py --config.model.path=...  # SAEmnesia
  python -m saemnesia_jax.scores   --config configs/sd15_sup.py --config.model.path=...
  python -m saemnesia_jax.evaluate --config configs/sd15.py --config.model.path=... \
      --config.evaluate.classifier_dir=...

Evaluation judges with UnlearnCanvas' ViT-L classifiers (run in JAX, read with
torch): --config.evaluate.classifier_dir=<folder with style_classifier.pth and
object_classifier.pth>. The 50 style and 20 object names are the
classifiers' class names (saemnesia_jax/evaluation/unlearncanvas.py, from the public
UnlearnCanvas evaluation code).
"""
import ml_collections

from saemnesia_jax.runtime import config_defaults
from saemnesia_jax.evaluation import unlearncanvas


def get_config():
  config = ml_collections.ConfigDict()
  config.workdir = "runs/sd15"
  # released: every protocol field left at '' / -1 takes what SAeUron's and SAEmnesia's released
  # code does; project: the project's choices (evaluation/protocol.py; docs/method.md's protocol table).
  config.protocol = "released"
  config.model = ml_collections.ConfigDict(dict(
      path="/path/to/stable-diffusion-v1-5",
      dtype="bfloat16",
      weights="auto",
      seed=0,
      attention="auto",
  ))
  config.block = "up_blocks.1.attentions.1"  # objects (SAeUron's and SAEmnesia's)
  # SAeUron's published style results clamp here; each stage runs per block
  # into {workdir}/{block}/ (saemnesia_jax/diffusion/blocks.py). '' -> block for both.
  config.style_block = "up_blocks.1.attentions.2"
  config.sampler = ml_collections.ConfigDict(dict(
      num_steps=50,
      guidance_scale=9.0,
      height=512,
      width=512,
      batch_size=8,
  ))
  config.prompts = ("A Dogs image in Van Gogh style.",)
  config.seeds = (188, 288, 588, 688, 888)
  config.concepts = ml_collections.ConfigDict(dict(
      objects=unlearncanvas.OBJECT_CLASSES,
      styles=unlearncanvas.STYLES,  # the 50 UnlearnCanvas styles (Seed_Images is the no-style class)
      style_template="A {object} image in {style} style.",
      anchor_templates=("A {object} image.",),
      spaces_in_prompts=True,  # "Van_Gogh" is written "Van Gogh" in prompts, as UnlearnCanvas / SAeUron do
      no_style="Seed_Images",  # the unstyled answer-set prompt: "A {object} image in Seed Images style."
  ))
  config_defaults.add_stage_sections(
      config,
      # SAeUron's collection: UnlearnCanvas' anchor prompts (80 per object)
      # in each of the 50 styles, in Seed_Images and plain (52 x 80 x 20 =
      # 83,200 prompts), none of them an evaluation prompt; one seed each,
      # 10,000 + prompt index (distinct noise per prompt, none an evaluation seed).
      collect=dict(seeds=(10_000,), seed_stride=1, prompts_per_object=0,
                   anchor_prompts_dir=("/path/to/UnlearnCanvas/machine_unlearning/mu_concept_ablation_ca/"
                                       "anchor_prompts/finetune_prompts")),
      # SAeUron's schedules: 5 epochs of the store at the object block, 10 at
      # the style block (no early stop; the export is the end of the
      # schedule), steps derived from each store. Batches of 16 whole maps
      # (4,096 tokens), as the released trainer draws them (train.batch_from).
      train=dict(epochs=5.0, style_block_epochs=10.0, batch_size=4096, learning_rate=4e-4,
                 mesh_shape=(-1, 1), batch_from="maps"),
      evaluate=dict(sequential_objects=("Bears", "Cats", "Flowers", "Frogs", "Jellyfish", "Sea",
                                        "Statues", "Sandwiches", "Waterfalls"),
                    classifier="unlearncanvas", num_steps=100),
      # SAEmnesia's fine-tune at the published recipe (configs/sd15_sup.py): 150 epochs of the
      # 80% train split of the store actually collected (the trainer derives the steps from it),
      # Adam 5e-6, early stopping with patience 5; 128 maps in 8 slices (1.4 GiB of step
      # temporaries instead of 12.7, the same update).
      pipeline=dict(sup_train=dict(epochs=150.0, batch_size=128, learning_rate=5e-6, lr_decay="constant",
                                   adam_eps=1e-8, eval_every=1000, patience=5, early_stop=True,
                                   micro_batches=8)),
  )
  return config
