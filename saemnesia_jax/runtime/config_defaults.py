"""Defaults of the sections shared by every config (model, sampler, collect, sae,
train, scores, probe, evaluate), documented once; a config file takes them and
overrides values.

Each field's documentation is the comment at the end of its line: every
stage's ``--help`` prints it (``runtime/config_docs.py`` reads this file), so a new
field needs one.

  from saemnesia_jax.runtime import config_defaults
  config_defaults.add_stage_sections(config, sae=dict(k=8), train=dict(steps=3000))

An override of a field that does not exist is an error (a typo, not a new key).
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from saemnesia_jax.runtime import layout, registry

# Top-level fields of every config.
TOP = dict(
    workdir="runs/default",  # folder of every stage's outputs
    block="up_blocks.1.attentions.1",  # the hooked UNet block, named as diffusers names it (objects)
    style_block="",  # the block of the style erasures ('' -> block): SAeUron's styles use up_blocks.1.attentions.2
    protocol="project",  # released (what SAeUron's and SAEmnesia's released code does) | project (the project's choices): the value of every protocol field left at '' / -1 (evaluation/protocol.py; docs/method.md, the protocol table)
    overwrite=False,  # True: delete a run's outputs made under other settings and start it afresh
    dry_run=False,  # compile only, print per-device memory and speed at peak: train (the step, for the mesh) | sample / collect / evaluate (the sampler, from config files alone)
    topology="",  # with dry_run: compile for this Cloud TPU slice from this host (v5e-4, v5e-8, v5p-8, v5p-64, v6e-8, v4-32, ...; v4/v5p names count TensorCores, 2 per chip; needs pip install '.[tpu]'); '' -> the local devices
    prompts=(),  # stage sample: the prompts to draw
    seeds=(),  # stage sample: seeds per prompt
)

# The diffusion model (a diffusers-format directory).
MODEL = dict(
    path="",  # a diffusers directory; 'canvas_mini': the shipped model; '': a tiny random pipeline in workdir
    dtype="float32",  # float32 | bfloat16 | float16: parameters and activations
    weights="auto",  # auto (Flax if present, else PyTorch) | flax | pt
    seed=0,  # seed of the tiny random pipeline (path '')
    attention="auto",  # UNet attention: auto (memory-efficient at >= 64x64 latents) | plain | memory_efficient
)

# DDIM (eta 0) with classifier-free guidance.
SAMPLER = dict(
    num_steps=50,  # DDIM steps
    guidance_scale=9.0,  # classifier-free guidance scale
    height=0,  # pixels; 0 -> the model's default size
    width=0,  # pixels; 0 -> the model's default size
    batch_size=4,  # prompts per jitted sampler call (each is 2 UNet rows with CFG)
)

# The prompt grid: every object x style, plus anchor prompts without a style.
CONCEPTS = dict(
    objects=(),  # object names (ids are positions)
    styles=(),  # style names (ids are positions)
    style_template="A {object} image in {style} style.",  # prompt of an (object, style) pair
    anchor_templates=("A {object} image.",),  # prompts of an object without a style
)

COLLECT = dict(
    store_path="",  # '' -> {workdir}/activations
    dtype="bfloat16",  # stored activations: bfloat16 | float16
    compression="blosc-lz4",  # blosc-lz4 | blosc-zstd | none: none reads faster (no decompression), 13% more disk
    seeds=(1, 2),  # per prompt
    seed_stride=0,  # >0: prompt i's trajectory for seed s uses s + i * seed_stride (distinct noise per prompt)
    anchor_prompts_dir="",  # '' -> the concept grid; else a folder of sd_prompt_<object>.txt (UnlearnCanvas' anchors)
    prompts_per_object=0,  # with anchor_prompts_dir: the first n lines of each file; 0 -> all
    allow_eval_overlap=False,  # collect (prompt, seed) pairs the evaluation judges (else an error)
    process_index=-1,  # -1: jax.process_index()
    process_count=0,  # 0: jax.process_count()
    max_units=0,  # >0: stop after this many units (a partial run; rerun to finish)
)

# The sparse autoencoder (stage train; docs/method.md sections 2-3).
SAE = dict(
    mode="unsupervised",  # unsupervised (SAeUron) | supervised (SAEmnesia)
    d_in=0,  # 0: the store's width; else it must match the store
    expansion_factor=16,  # latents per input dimension (n_latents = d_in * this)
    n_latents=0,  # 0: d_in * expansion_factor
    k=32,  # active latents per token
    batch_topk=True,  # BatchTopK in training (SAeUron); the clamp uses per-token TopK
    auxk_alpha=1 / 32,  # weight of the AuxK loss (dead latents reconstruct the residual)
    k_aux=0,  # 0: d_in // 2
    dead_tokens=10_000_000,  # a latent is dead after this many tokens without firing
    sparse_decode=False,  # gather the k active decoder rows (needs batch_topk=False)
    backward="auto",  # auto (sparse, dense on TPU) | sparse (O(k) work per token after the encoder) | dense
    selection="auto",  # dense backward: exact (top_k and a scatter) | threshold (a mask; BatchTopK over each token's top 4k candidates) | auto (threshold on TPU)
    matmul_dtype="",  # unsupervised training: '' (the parameters' dtype) | bfloat16 (mixed precision: bf16 operands, f32 accumulate)
    init_from="",  # a sparsify-layout SAE folder to start from (the supervised fine-tune)
    assignment="greedy",  # supervised: greedy (from the scores stage) | random | a JSON path
    scores_dir="",  # '' -> {workdir}/sae_unsup/scores
    sup_loss="bce",  # bce (released code) | softmax (per-domain cross-entropy)
    w_sup=3.0,  # supervised: weight of the concept loss
    w_l1=0.01,  # supervised: weight of mean |z| (sparsity)
    w_decorr=0.1,  # supervised: weight of the object-style latent decorrelation
)

# The SAE trainer. batch_size counts tokens (unsupervised) or whole maps (supervised).
TRAIN = dict(
    name=layout.UNSUP_RUN,  # run folder under workdir
    steps=10_000,  # optimizer steps (a finished run continues to a larger value)
    epochs=0.0,  # >0: steps = ceil(epochs x batches per epoch of the store's train split), printed; 0 -> steps
    style_block_epochs=0.0,  # >0: train.epochs of the style block's SAE (config.style_block); 0 -> epochs
    batch_size=4096,  # tokens per step (unsupervised) or maps per step (supervised)
    learning_rate=4e-4,  # Adam's peak learning rate
    lr_decay="linear",  # linear | constant
    final_lr_fraction=0.0,  # linear decay ends at learning_rate * this
    adam_eps=6.25e-10,  # Adam's epsilon
    grad_clip=1.0,  # clip the global gradient norm to this
    seed=0,  # parameter init, data order and the train/validation split
    val_fraction=0.2,  # held out by (prompt, seed): all steps of an image on one side
    val_batches=20,  # batches per validation
    eval_every=250,  # steps between validations (early stopping, best export)
    early_stop=False,  # stop after `patience` evaluations without a val gain, export the best; else full schedule
    patience=5,  # early stopping, in evaluations without a gain
    min_delta=0.0,  # a validation loss must drop by more than this to count as a gain
    log_every=50,  # steps between metrics.jsonl lines
    ckpt_every=250,  # steps between checkpoints
    keep_checkpoints=2,  # checkpoints kept on disk
    stop_after=0,  # >0: stop after this many steps without a final checkpoint (tests)
    batch_from="tokens",  # unsupervised: tokens shuffled across maps (tokens) | whole maps, batch_size / tokens_per_map of them (maps: SAeUron's released batches, 16 maps of 256 tokens)
    micro_batches=1,  # supervised: slices per batch, gradients accumulated (the same update, 1/n of the memory)
    buffer_chunks=32,  # store chunks mixed in the reader's shuffle buffer
    init_tokens=4096,  # tokens for the geometric-median b_dec
    check_model=True,  # refuse a store made by another model (weights hash)
    mesh_shape=(-1, 1),  # (data, model); -1: the remaining devices
    sharding_rules=(("W_enc", (None, "model")), ("b_enc", ("model",)),
                    ("W_dec", ("model", None)), (".*", ())),  # (name regex, partition); first match wins
)

# Importance scores and the concept -> latent assignment (stage scores; docs/method.md section 3).
SCORES = dict(
    sae_dir="",  # '' -> {workdir}/sae_unsup/export; the supervised run: {workdir}/sae_sup/export
    out_dir="",  # '' -> {sae_dir}/../scores (beside the SAE run)
    batch_size=256,  # maps per device batch
    split="all",  # all | train | val (the store reader's split)
    val_fraction=0.0,  # with split train / val: the trainer's value
    split_seed=0,  # with split train / val: the trainer's seed
    mass_fraction=0.9,  # the association report's "latents to reach this share of the score mass"
)

# The linear probe of a block's map-mean activations (stage probe): does the block carry the concepts?
PROBE = dict(
    steps=1500,  # Adam steps of the softmax regression
    batch_size=256,  # maps
    learning_rate=3e-3,  # Adam's learning rate
    val_fraction=0.2,  # held out by (prompt, seed), as the trainer's split
    split_seed=0,  # seed of the held-out split
    seed=0,  # parameter init and batch order
    out_dir="",  # '' -> {workdir}/probe
)

# Unlearning and its evaluation (stage evaluate; docs/method.md sections 5-6).
EVALUATE = dict(
    out_dir="",  # '' -> {workdir}/eval
    methods=("none", "saeuron", "saemnesia"),  # none (no erasure) | saeuron | saemnesia
    saeuron_sae="",  # '' -> {workdir}/sae_unsup/export
    saeuron_scores="",  # '' -> {workdir}/sae_unsup/scores
    saemnesia_sae="",  # '' -> {workdir}/sae_sup/export
    saemnesia_scores="",  # '' -> {workdir}/sae_sup/scores
    saemnesia_assignment="trained",  # trained (the SAE's own, saemnesia.json) | rescored (greedy on its scores)
    objects=(),  # concepts to erase; () -> all
    styles=(),  # styles to erase; () -> all
    gammas=(-1.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0),  # the clamp multiplier (docs/method.md)
    percentiles=(99.99, 99.995, 99.999),  # SAeUron: per-step score percentile (3 / 2 / 1 of 20,480)
    num_steps=0,  # DDIM steps of every evaluation sample (the protocol: 100); 0 -> sampler.num_steps
    sweep_seeds=(1,),  # seeds of the answer sets that choose each concept's setting (pooled; one unit per seed)
    eval_seeds=(188, 288, 588, 688, 888),  # held-out seeds of the reported tables
    rule_seeds=(),  # development seeds: each method's rule (the papers' or a variant) is chosen on them by Table 1's avg, and the table shows the chosen rows and the papers'; () -> every row, no choice
    max_latents=32,  # clamp entries (one compile per size)
    seed_images=True,  # the answer set holds each object's unstyled prompt (Seed_Images) as UnlearnCanvas does
    sequential=True,  # also erase the first 1, 2, ... objects at once
    sequential_objects=(),  # order of sequential unlearning; () -> concepts.objects
    classifier="canvas_mini",  # canvas_mini | canvas_mini_no_object (its object head can answer "no object") | unlearncanvas (the ViT-L checkpoints; torch reads them)
    classifier_dir="",  # unlearncanvas: the folder with style_classifier.pth and object_classifier.pth
    grids=True,  # write before/after image grids
    grid_rows=(),  # the erasure grid's rows by table label, e.g. ("saemnesia", "saemnesia [bucoh]"); () -> every method under every rule
    variants=(),  # other erasure rules, each run for every method beside the papers': "<name>: scale=self threshold=target gammas=0/-1 gammas.saemnesia=... select=ua_ira_cra ..." (evaluation/variants.py)
    chosen_from="",  # an earlier evaluation's summary.json / chosen.json (same grid): the rows it covers skip their sweep
    recognised_confidence=0.8,  # quality: softmax probability at which the other domain's classifier still recognises an erased concept's image
    # Protocol fields: '' (or -1) takes config.protocol's value (evaluation/protocol.py).
    saemnesia_selection="",  # SAEmnesia's latents: percentile (released: the percentile hook on the supervised SAE's scores) | assigned (project: its trained latent at every step)
    saemnesia_percentiles=(99.999,),  # saemnesia_selection=percentile: SAEmnesia's percentile grid (the value is not in the release; 99.999 from the authors' sweep job)
    style_prompt="",  # evaluation prompt of (object, style): a template with {object} and {style} | concepts (project: config.concepts'); released: "An image of {object} in {style} style."
    unstyled_prompt="",  # evaluation prompt of an object without style: a template with {object} | concepts (project: the Seed Images prompt); released: "An image of {object}."
    noise="",  # starting noise: per_image (released: fresh noise for every image of a seed) | per_seed (project: one noise per seed, shared by its prompts)
    style_cra="",  # CRA of a style erasure: unstyled (released: object accuracy on the unstyled images only) | all (project: on every image)
    jpeg_quality=-1,  # judge images after a JPEG save at this quality (released: 75, PIL's default) | 0 (project: the raw images); -1: the protocol's
    saeuron_styles="",  # SAeUron's style settings: fixed (released: saeuron_style_setting for every style, no sweep) | sweep (project: percentiles x gammas)
    saeuron_style_setting=(99.999, -1.0),  # saeuron_styles=fixed: (percentile, gamma) of every style (SAeUron's README)
    dtype="",  # sampling precision: float16 (released) | bfloat16 | float32 | model (project: model.dtype)
    sae_dtype="",  # the clamp's SAE: float16 (released, with the kept error in float32) | bfloat16 | float32 (project)
    kept_error="",  # block output: xhat_minus_x (released: decode(z_edit) + (x_hat - x)) | x_minus_xhat (project: x + decode(z_edit) - decode(z))
)

# Erase concepts now (stage unlearn): the same prompts and seeds with and without the erasure.
UNLEARN = dict(
    concepts=(),  # object / style names to erase at once, e.g. "('Disk',)" or "('Disk', 'Neon')"; required
    methods=("saemnesia", "saeuron"),  # one column per method and seed: saemnesia | saeuron
    gamma=0.0,  # the clamp multiplier for every concept (negative); 0 -> each concept's chosen gamma
    percentile=0.0,  # saeuron's per-step score percentile for every concept; 0 -> the chosen one
    sae_root="",  # folder with sae_unsup/ and sae_sup/ (export/ + scores/); '' -> shipped (canvas_mini) or workdir
    sae_dir="",  # one method only: its SAE folder (sparsify layout); '' -> {sae_root}/sae_*/export
    scores_dir="",  # one method only: its scores folder; '' -> {sae_root}/sae_*/scores
    chosen="",  # JSON of chosen settings (chosen.json / evaluate's summary.json); '' -> found in sae_root
    prompts=(),  # () -> 2 prompts with each concept and 2 without, from config.concepts' template
    seeds=(188, 288),  # one column per seed and method
    batch_size=0,  # images per sampler call; 0 -> all of one method at once (at most sampler.batch_size)
    out_dir="",  # '' -> {workdir}/unlearn
)

# Does the erasure hold? An adversarial prompt prefix against it (stage attack; UnlearnDiffAtk-style, docs/method.md).
ATTACK = dict(
    out_dir="",  # '' -> {workdir}/attack
    methods=("none", "saeuron", "saemnesia"),  # the erasures attacked: none (the base model: the ceiling) | saeuron | saemnesia
    objects=(),  # objects attacked; () -> evaluate.objects (or every object)
    styles=(),  # styles attacked; () -> evaluate.styles (or every style)
    chosen_from="",  # each concept's setting: an evaluation's summary.json / chosen.json; '' -> {workdir}/eval/summary.json
    prompts=2,  # prompts attacked per concept: the first n of the evaluation grid's prompts holding it, each with its own prefix
    prefix_tokens=3,  # N adversarial tokens prepended to the prompt (UnlearnDiffAtk: 3 for objects and styles, 5 for nudity)
    steps=40,  # optimizer steps per prompt (UnlearnDiffAtk: 40 iterations per sampled timestep)
    learning_rate=0.01,  # AdamW's learning rate on the prefix embeddings (UnlearnDiffAtk: 0.01)
    weight_decay=0.1,  # AdamW's weight decay (UnlearnDiffAtk: 0.1)
    timesteps_per_step=1,  # random sampler steps (timestep + noise) averaged in each optimizer step's loss
    check_every=10,  # steps between scorings of the projected prefix on fixed timesteps; the best is kept
    check_timesteps=4,  # evenly spaced sampler steps of that fixed objective
    target_seeds=(7, 8),  # seeds of the base model's own samples of the concept (no erasure): the images the attack denoises; outside every judged seed
    seeds=(),  # seeds of the judged images (before and after the attack); () -> evaluate.eval_seeds
    seed=0,  # the prefix's starting tokens and the random timesteps and noise
    remat=True,  # jax.checkpoint on each UNet call (with its clamp) in the loss: memory of one call per timestep
    grid=True,  # write grid.png: unattacked and attacked images per concept and method
    stop_after=0,  # >0: stop after this many units (a partial run, as a crash leaves it; rerun to finish)
)

# The whole method in one command (module pipeline): every stage in order, skipping finished ones.
PIPELINE = dict(
    stages=registry.DEFAULT_STEPS,  # which pipeline steps to run, in this order (attack: add it to run the attack after evaluate)
    sup_loss="",  # the supervised fine-tune's sae.sup_loss; '' -> config.sae.sup_loss
    sup_train=dict(),  # train fields of the supervised fine-tune (config_defaults.make_supervised)
    judge="",  # 'module:factory' of the evaluation's classifiers; '' -> config.evaluate.classifier
    quick=False,  # a smaller run in {workdir}/quick (shares the store): the quick_* fields below
    quick_train_steps=1500,  # quick: unsupervised SAE steps
    quick_concepts=3,  # quick: erase the first n objects and the first n styles only
    quick_gammas=(-0.5, -2.0),  # quick: the gamma grid of both methods
    quick_percentiles=(99.9,),  # quick: SAeUron's percentile grid
    quick_eval_seeds=(188,),  # quick: the held-out seeds of the table
)

SECTIONS = {"collect": COLLECT, "sae": SAE, "train": TRAIN, "scores": SCORES, "probe": PROBE,
            "evaluate": EVALUATE, "unlearn": UNLEARN, "attack": ATTACK, "pipeline": PIPELINE}


SHARED = {"model": MODEL, "sampler": SAMPLER, "concepts": CONCEPTS}


def add_stage_sections(config: ml_collections.ConfigDict, **overrides: dict) -> ml_collections.ConfigDict:
  """Adds the collect / sae / train / evaluate sections, with ``overrides`` per
  section, the top-level ``overwrite`` field, and the defaults of any model /
  sampler / concepts field the config does not set."""
  for field in ("protocol", "overwrite", "dry_run", "topology", "style_block"):  # the top-level fields every config gets
    if field not in config:
      config[field] = TOP[field]
  for name, defaults in SHARED.items():
    if name in config:
      for field, value in defaults.items():
        if field not in config[name]:
          config[name][field] = value
  unknown = set(overrides) - set(SECTIONS)
  if unknown:
    raise KeyError(f"unknown config sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
  for name, defaults in SECTIONS.items():
    extra = set(overrides.get(name, {})) - set(defaults)
    if extra:
      raise KeyError(f"config.{name} has no fields {sorted(extra)}; known: {sorted(defaults)}")
    config[name] = ml_collections.ConfigDict({**defaults, **overrides.get(name, {})})
  return config


def make_supervised(config: ml_collections.ConfigDict, **train: object) -> ml_collections.ConfigDict:
  """Turns a config into its SAEmnesia fine-tune: supervised mode started from
  the unsupervised run's export, run folder ``sae_sup``, and the scores stage
  pointed at it; ``train`` overrides fields of the train section.

  The paths follow ``workdir`` (field references), so ``--config.workdir=...``
  moves them too.
  """
  workdir = config.get_ref("workdir")
  config.sae.mode = "supervised"
  config.sae.init_from = workdir + "/sae_unsup/export"
  config.scores.sae_dir = workdir + "/sae_sup/export"
  config.train.name = layout.SUP_RUN
  config.train.early_stop = True  # the published recipe: patience on a validation split
  config.train.style_block_epochs = 0.0  # one budget for both blocks unless ``train`` says otherwise
  extra = set(train) - set(TRAIN)
  if extra:
    raise KeyError(f"config.train has no fields {sorted(extra)}; known: {sorted(TRAIN)}")
  config.train.update(train)
  return config


def supervised_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The supervised fine-tune of ``config`` as its pipeline section describes it
  (``pipeline.sup_loss``, ``pipeline.sup_train``): what the pipeline stage runs
  and what a config such as configs/canvas_mini_sup.py returns."""
  config = ml_collections.ConfigDict(config.to_dict())  # a copy, fields references resolved below
  p = config.pipeline
  if p.sup_loss:
    config.sae.sup_loss = p.sup_loss
  return make_supervised(config, **p.sup_train.to_dict())


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file ``name`` beside ``config_file`` (a
  config built on another, loaded by path: configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f"_saemnesia_config_{os.path.splitext(name)[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def quick_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quick variant: {workdir}/quick, the full run's store, the pipeline.quick_* settings."""
  p = config.pipeline
  q = ml_collections.ConfigDict(config.to_dict())
  q.collect.store_path = layout.store_path(config)
  q.workdir = layout.quick_workdir(config.workdir)
  q.train.steps = int(p.quick_train_steps)
  n = int(p.quick_concepts)
  ev = q.evaluate
  ev.objects = tuple(ev.objects or config.concepts.objects)[:n]
  ev.styles = tuple(ev.styles or config.concepts.styles)[:n]
  ev.sequential_objects = tuple(ev.sequential_objects or config.concepts.objects)[:n]
  ev.gammas, ev.percentiles = tuple(p.quick_gammas), tuple(p.quick_percentiles)
  ev.eval_seeds = tuple(p.quick_eval_seeds)
  ev.variants, ev.rule_seeds = (), ()  # quick: the papers' rule only
  return q
