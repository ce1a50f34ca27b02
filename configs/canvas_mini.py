"""CanvasMini: the miniature UnlearnCanvas (docs/method.md section 7).

Run the whole method on it (every stage, then the report):

  python -m saemnesia_jax.pipeline --config configs/canvas_mini.py

Train and ship the object / style classifiers (writes
saemnesia_jax/assets/canvas_mini/classifiers/):

  python -m saemnesia_jax.canvas_mini.classifiers --config configs/canvas_mini.py

Build the whole miniature (classifiers if needed, the base diffusion model,
its evaluation, the export into saemnesia_jax/assets/canvas_mini/pipeline/):

  python -m saemnesia_jax.canvas_mini.build --config configs/canvas_mini.py

Sections: ``data`` is the generator, ``classifier`` the judges, ``model`` /
``base_train`` / ``base_eval`` the base diffusion model and its build; ``workdir``,
``block``, ``sampler``, ``prompts`` and ``seeds`` are what every pipeline
stage (sample, collect, ...) reads, as in configs/tiny.py and configs/sd15.py.

The model: pixel space at 16x16; three levels (16, 8, 4 px) with channels
(32, 64, 64) so that, as in SD, ``up_blocks.1`` is the second-coarsest up
level; cross-attention at 8x8 (down_blocks.1, up_blocks.1) and in the 4x4
mid block only.

The hooked block is the mid block's cross-attention transformer,
``mid_block.attentions.0``: (4, 4, 64), 16 tokens of d_in = 64. It is not
the block that matches the papers' ``up_blocks.1.attentions.1`` (the same
name here, 8x8 = 64 tokens), because there this model does not carry its
objects in the map mean, which SAeUron's scores and SAEmnesia's supervision
both read.

The clamp's gammas (evaluate.gammas) are scaled to this SAE: the clamp
multiplies a latent by gamma * mu_target, and mu_target is a few activation
units here, so the grids span -0.05 .. -40 rather than the papers'
(-1 ... -30). The evaluation section says how Table 1 is made fair.

The measurements behind these choices (the classifiers' accuracy, the model
sizes, the probe of each block, the gamma trial) are in docs/results.md.
"""
import ml_collections

from saemnesia_jax.runtime import config_defaults

SAEMNESIA_GAMMAS = "-0.05/-0.15/-0.4/-1/-2.5/-6/-15/-40"  # evaluate.variants' SAEmnesia grid


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # The generator (saemnesia_jax/canvas_mini/data.py).  Lengths are canvas
  # units: 1 unit = image_size / 16 pixels.
  data = config.data = ml_collections.ConfigDict()
  data.image_size = 16
  # The concept lists must equal data.OBJECTS / data.STYLES (ids are their
  # positions; the no-style class "SeedImages" has id len(styles)); they are
  # here so that every run records what it was trained on.
  data.objects = ("Disk", "Square", "Ring", "Frame", "Beam", "Pillar", "Plus", "Tee", "Corner",
                  "Slash")
  data.styles = ("Stripes", "Checker", "Gradient", "Neon", "Pastel", "Monochrome", "Sunset",
                 "Noisy", "Comic", "Blueprint")
  data.no_style = "SeedImages"
  data.position_jitter = 1.0      # max shift per axis, canvas units
  data.scale_jitter = 0.12        # scale uniform in [1 - s, 1 + s]
  data.rotation_jitter_deg = 5.0  # small: orientation is the identity of Beam / Pillar / Tee / Corner
  data.train_seed = 0             # classifier training images
  data.eval_seed = 1              # held-out images, never used in training
  data.grid_seed = 2              # the sample grid PNG

  # The judges (saemnesia_jax/canvas_mini/classifiers.py): two small CNNs.
  clf = config.classifier = ml_collections.ConfigDict()
  clf.widths = (16, 32, 32)       # conv channels per resolution (16, 8, 4 px), two 3x3 convs each
  clf.steps = 2000
  clf.batch_size = 128
  clf.learning_rate = 2e-3        # peak of a warm-up + cosine schedule (Adam)
  clf.warmup_steps = 100
  clf.n_train = 24000             # training images rendered once from data.train_seed
  clf.n_eval = 4400               # 40 per (object, style class) pair, from data.eval_seed
  clf.init_seed = 0               # parameter init and augmentation draws
  # Augmentation, so that blurrier / noisier diffusion samples are still judged
  # right: per image, Gaussian noise with sigma ~ U(0, noise_max), a 3x3
  # binomial blur mixed in with weight ~ U(0, blur_max), brightness shift
  # ~ U(-brightness, brightness).
  clf.aug_noise_max = 0.05
  clf.aug_blur_max = 0.8
  clf.aug_brightness = 0.03
  # Corrupted evaluations reported beside the clean one: level i adds Gaussian
  # noise eval_noise[i] after mixing in the 3x3 blur with weight eval_blur[i].
  clf.eval_noise = (0.04, 0.08)
  clf.eval_blur = (0.5, 1.0)
  # > 0: train the no-object judge instead (an 11th object class for images
  # without a shape, this share of the training images; the shipped style head
  # is kept). Its assets are saemnesia_jax/assets/canvas_mini/classifiers_no_object,
  # made with --config.classifier.no_object_share=0.2 --out_dir=<that folder>.
  clf.no_object_share = 0.0

  # --- the base diffusion model (saemnesia_jax/canvas_mini/build.py) ---
  config.workdir = "runs/canvas_mini"
  model = config.model = ml_collections.ConfigDict()
  model.path = "canvas_mini"  # the shipped pipeline; or a diffusers directory
  model.dtype = "float32"
  model.weights = "auto"
  model.seed = 0
  model.attention = "auto"
  model.block_out_channels = (32, 64, 64)
  model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  model.layers_per_block = 1
  model.num_heads = 2
  model.text_width = 64
  model.text_layers = 2
  model.text_heads = 2
  # The pooled text embedding is also added to the timestep embedding (SDXL's
  # 'text_time' addition): without it a first build learned styles but drew
  # the same shape for every object (object accuracy 13.6% at 2,000 steps).
  model.pooled_text_conditioning = True
  model.time_id_dim = 8
  model.max_length = 12  # "<bos> a disk image in stripes style . <eos>" is 9 tokens
  # DDPM's linear schedule suits pixel space ([-1, 1] images); SD's
  # scaled-linear one was made for VAE latents.
  model.beta_schedule = "linear"
  model.beta_start = 1e-4
  model.beta_end = 0.02
  # What the UNet predicts once training is past base_train.epsilon_steps. An
  # epsilon model's x0 estimate at high noise is its error times
  # 1/sqrt(alpha_bar) (about 100 at t = 961, the first of 25 DDIM steps), so a
  # 6,000-step epsilon model fixed every image's mean colour wrongly in the
  # first steps: near-black and near-white grounds came out mid-grey (Neon 2%,
  # Pastel 0%), while its x0 estimates at t <= 700 were right. v-prediction
  # estimates x0 directly at high noise.
  model.prediction_type = "v_prediction"

  train = config.base_train = ml_collections.ConfigDict()
  train.steps = 9000
  # Two phases, as the shipped model was trained: epsilon-prediction for the
  # first 6,000 steps (it learned every shape: objects 98.7%), then a
  # v-prediction fine-tune with its own warm-up + cosine schedule (see
  # model.prediction_type). 0 = one phase with model.prediction_type.
  train.epsilon_steps = 6000
  train.finetune_learning_rate = 3e-4
  train.finetune_warmup_steps = 100
  train.batch_size = 64
  train.learning_rate = 1e-3
  train.final_lr_fraction = 0.02
  train.warmup_steps = 200
  train.weight_decay = 1e-4
  train.grad_clip = 1.0
  train.ema_decay = 0.999
  train.prompt_dropout = 0.1
  train.seed = 0
  train.log_every = 50
  train.eval_every = 1000
  train.ckpt_every = 250

  ev = config.base_eval = ml_collections.ConfigDict()
  ev.num_steps = 25
  ev.batch_size = 110  # one object x style-class grid per batch
  ev.train_seeds = (7,)  # quick check during training
  ev.seeds = (188, 288, 588, 688, 888)  # the final evaluation (UnlearnCanvas' seeds)
  # Pixel-space at 16 px saturates at the papers' CFG 9 (at 3,750 steps: objects
  # 98% at CFG 1.5, 91% at 3, 29% at 6), so the build picks among low scales.
  ev.guidance_scales = (1.5, 2.0, 3.0, 4.5)

  config.build = ml_collections.ConfigDict(dict(export_dir=""))  # '' -> the package's assets

  # --- what every pipeline stage reads ---
  config.block = "mid_block.attentions.0"  # see the docstring: the probe
  config.sampler = ml_collections.ConfigDict(dict(
      num_steps=25, guidance_scale=1.5, height=0, width=0, batch_size=110))  # chosen by the build
  config.prompts = ("A Disk image in Neon style.", "A Plus image in Comic style.")
  config.seeds = (188, 288, 588)
  # The concepts of the prompt grid (collect, scores, evaluate): must equal
  # the generator's (saemnesia_jax/canvas_mini/data.py; tested).
  config.concepts = ml_collections.ConfigDict(dict(
      objects=data.objects,
      styles=data.styles,
      style_template="A {object} image in {style} style.",
      anchor_templates=("A {object} image.", "An image of a {object}.", "A photo of a {object}."),
  ))
  config_defaults.add_stage_sections(
      config,
      # 130 prompts x 4 seeds x 25 steps = 13,000 maps of 16 tokens. No seed
      # of the collection is judged: the evaluation's seeds are 5, 6 and 188.
      collect=dict(seeds=(0, 1, 2, 3)),
      sae=dict(expansion_factor=16, k=8, dead_tokens=1_000_000),
      # early_stop=True: the committed results come from the best-validation
      # export; the papers' protocol trains the full schedule (False).
      train=dict(steps=3000, early_stop=True),
      # Table 1 as a reviewer would accept it (docs/results.md, 2026-12-08):
      # - one judge for every row: the object head that can answer "no object";
      # - each concept's setting swept on seed 5 (in no collection), each
      #   method's rule chosen on seed 6 by Table 1's average, the table on
      #   seed 188, used for neither choice (one seed for the 2-core budget:
      #   the table's intervals say what it buys; add seeds to narrow them);
      # - equal grids, 8 trials per concept for both methods: SAeUron 2
      #   percentiles (of 1,024 latents, about 3 and 1 of them) x 4 gammas,
      #   SAEmnesia 8 gammas (a superset of SAeUron's 4), spanning 0.05 .. 40
      #   so that a choice at either end would show the grid is too narrow;
      # - the rules: the papers' selection (UA + IRA) / 2 on the equal grid
      #   [grid], (UA + IRA + CRA) / 3 [cra], (UA + coherent UA + IRA) / 3
      #   [ucoh] (evaluation/variants.py); the papers' rule at the papers'
      #   budget (SAEmnesia: 4 gammas) is the plain row. The clamp's gammas
      #   are scaled to this SAE: it multiplies a latent by gamma * mu_target,
      #   a few activation units here.
      # sequential=False: Table 1 only (--config.evaluate.sequential=True adds
      # sequential unlearning).
      evaluate=dict(percentiles=(99.7, 99.9), gammas=(-0.15, -1.0, -6.0, -40.0),
                    variants=tuple(f"{name}: {select}gammas.saemnesia={SAEMNESIA_GAMMAS}" for name, select in
                                   (("grid", ""), ("cra", "select=ua_ira_cra "),
                                    ("ucoh", "select=ua_coherent_ira "))),
                    sweep_seeds=(5,), rule_seeds=(6,), eval_seeds=(188,),
                    classifier="canvas_mini_no_object", sequential=False, seed_images=False),
      # The SAEmnesia fine-tune (configs/canvas_mini_sup.py explains the choice).
      pipeline=dict(sup_loss="softmax",
                    sup_train=dict(steps=2000, batch_size=32, learning_rate=1e-3, lr_decay="constant",
                                   adam_eps=1e-8, eval_every=100)),
  )
  return config
