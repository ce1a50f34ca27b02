"""Tiny random SD-like pipeline on the CPU: the smoke test of every stage.

Runs in about a minute on 2 CPU cores:

  python -m saemnesia_jax.sample --config configs/tiny.py

With ``model.path = ''`` a random three-level SD-like pipeline (cross-attention
down and up blocks, a tiny VAE, a 2-layer CLIP text encoder and a word-level
tokenizer) is written to ``{workdir}/tiny_pipeline`` the first time. Its
samples are noise-like images: the point is the machinery, not the pictures.
The hooked block ``up_blocks.1.attentions.1`` has output (8, 8, 64) at 32x32.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.workdir = "runs/tiny"
  config.model = ml_collections.ConfigDict(dict(
      path="",  # '' -> write (once) and use a tiny random pipeline in workdir
      dtype="float32",  # float32 | bfloat16 | float16
      weights="auto",  # auto (Flax if present, else PyTorch) | flax | pt
      seed=0,  # seed of the tiny random pipeline
  ))
  config.block = "up_blocks.1.attentions.1"
  config.sampler = ml_collections.ConfigDict(dict(
      num_steps=20,
      guidance_scale=9.0,
      height=0,  # pixels; 0 -> the model's default size
      width=0,
      batch_size=4,
  ))
  config.prompts = (
      "A cat image in neon style.",
      "A dog image in pastel style.",
  )
  config.seeds = (188, 288, 588)
  # The concepts of the prompt grid (collect, scores, evaluate).
  config.concepts = ml_collections.ConfigDict(dict(
      objects=("cat", "dog"),
      styles=("neon", "pastel"),
      style_template="A {object} image in {style} style.",
      anchor_templates=("A {object} image.",),
  ))
  config.collect = ml_collections.ConfigDict(dict(
      store_path="",  # '' -> {workdir}/activations
      dtype="bfloat16",  # stored activations: bfloat16 | float16
      seeds=(1, 2),  # per prompt
      process_index=-1,  # -1: jax.process_index()
      process_count=0,  # 0: jax.process_count()
      max_units=0,  # >0: stop after this many units (a partial run; rerun to finish)
  ))
  # The sparse autoencoder (stage train; METHOD.md sections 2-3).
  config.sae = ml_collections.ConfigDict(dict(
      mode="unsupervised",  # unsupervised (SAeUron) | supervised (SAEmnesia)
      d_in=0,  # 0: the store's width; else it must match the store
      expansion_factor=4,
      n_latents=0,  # 0: d_in * expansion_factor
      k=8,  # active latents per token
      batch_topk=True,  # BatchTop8 in training (SAeUron); inference is per-token Top8
      auxk_alpha=1 / 32,
      k_aux=0,  # 0: d_in // 2
      dead_tokens=10000,  # a latent is dead after this many tokens without firing
      sparse_decode=False,  # gather the k active decoder rows (needs batch_topk=False)
      init_from="",  # a sparsify-layout SAE folder to start from (the supervised fine-tune)
      assignment="greedy",  # supervised: greedy (from the scores stage) | random | a JSON path
      scores_dir="",  # '' -> {workdir}/sae_unsup/scores
      sup_loss="bce",  # bce (released code) | softmax (per-domain cross-entropy)
      w_sup=3.0,
      w_l1=0.01,
      w_decorr=0.1,
  ))
  # Its trainer. batch_size counts tokens (unsupervised) or whole maps (supervised).
  config.train = ml_collections.ConfigDict(dict(
      name="sae_unsup",  # run folder under workdir
      steps=40,
      batch_size=256,
      learning_rate=0.001,
      lr_decay="linear",  # linear | constant
      final_lr_fraction=0.0,
      adam_eps=6.25e-10,
      grad_clip=1.0,
      seed=0,
      val_fraction=0.2,  # held out by (prompt, seed): all steps of an image on one side
      val_batches=4,
      eval_every=20,
      patience=5,  # early stopping, in evaluations without a gain
      min_delta=0.0,
      log_every=10,
      ckpt_every=20,
      keep_checkpoints=2,
      stop_after=0,  # >0: stop after this many steps without a final checkpoint (tests)
      buffer_chunks=32,
      init_tokens=4096,  # tokens for the geometric-median b_dec
      check_model=True,  # refuse a store made by another model (weights hash)
      mesh_shape=(-1, 1),  # (data, model); -1: the remaining devices
      sharding_rules=(("W_enc", (None, "model")), ("b_enc", ("model",)),
                      ("W_dec", ("model", None)), (".*", ())),
  ))
  # Unlearning and its evaluation (stage evaluate; METHOD.md sections 5-6).
  config.evaluate = ml_collections.ConfigDict(dict(
      out_dir="",  # '' -> {workdir}/eval
      methods=("none", "saeuron", "saemnesia"),
      saeuron_sae="",  # '' -> {workdir}/sae_unsup/export
      saeuron_scores="",  # '' -> {workdir}/sae_unsup/scores
      saemnesia_sae="",  # '' -> {workdir}/sae_sup/export
      saemnesia_scores="",  # '' -> {workdir}/sae_sup/scores
      objects=(),  # concepts to erase; () -> all
      styles=(),
      gammas=(-1.0, -10.0),
      percentiles=(99.0,),  # SAeUron: keep latents above this per-step percentile of scores
      sweep_seeds=(1,),
      eval_seeds=(188,),
      max_latents=32,  # clamp entries (one compile per size)
      sequential=True,
      sequential_objects=(),  # order of sequential unlearning; () -> concepts.objects
      classifier="canvas_mini",
      grids=True,
  ))
  return config
