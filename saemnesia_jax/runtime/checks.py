"""Checks of a config before a stage does any work.

``check(stage, config)`` raises ``errors.ConfigError`` naming the field, the
value and the fix. It runs before JAX is imported and creates nothing, so a
bad value costs a second and leaves no folder or file behind. It reads only
small JSON files (the model's ``unet/config.json``, a store's
``manifest.json``, an SAE's ``cfg.json``).
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Any, Callable

import ml_collections

from saemnesia_jax.diffusion import blocks
from saemnesia_jax.evaluation import protocol, variants
from saemnesia_jax.evaluation.concepts import ANCHOR_FILE
from saemnesia_jax.runtime import io_utils, layout, registry, schema, topology
from saemnesia_jax.runtime.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = ("auto", "flax", "pt")
# store_format.COMPRESSIONS (not imported: checks run before tensorstore loads)
STORE_COMPRESSIONS = ("blosc-lz4", "blosc-zstd", "none")


def _fail(field: str, value: Any, why: str, fix: str = "") -> None:
  raise ConfigError(f"config.{field}={value!r}: {why}" + (f"; {fix}" if fix else ""))


def _positive(config, *fields: str) -> None:
  for f in fields:
    v = _get(config, f)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
      _fail(f, v, "must be a positive number")


def _non_negative(config, *fields: str) -> None:
  for f in fields:
    v = _get(config, f)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
      _fail(f, v, "must be >= 0")


def _one_of(config, field: str, allowed) -> None:
  v = _get(config, field)
  if v not in allowed:
    _fail(field, v, f"expected one of {', '.join(map(repr, allowed))}")


def _get(config, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _fraction(config, field: str, lo_open: bool = False) -> None:
  v = _get(config, field)
  if not isinstance(v, (int, float)) or not (0 < v < 1 if lo_open else 0 <= v < 1):
    _fail(field, v, "must be a fraction in " + ("(0, 1)" if lo_open else "[0, 1)"))


def _process_count() -> int:
  try:
    return max(1, int(os.environ.get("SAEMNESIA_NUM_PROCESSES", "1") or 1))
  except ValueError:
    return 1


# ------------------------------------------------------------------ model


def model_dir(config) -> str | None:
  """The pipeline folder of config.model.path; None for the tiny pipeline not yet written."""
  path = layout.model_dir(config)
  return path if config.model.path or os.path.isdir(path) else None


def unet_blocks(unet_config: dict) -> list[str]:
  """Diffusers names of the attention and ResNet blocks of a UNet2DConditionModel config."""
  n = int(unet_config.get("layers_per_block", 2) if not isinstance(unet_config.get("layers_per_block"), list)
          else unet_config["layers_per_block"][0])
  names = []
  for i, t in enumerate(unet_config.get("down_block_types", ())):
    names += [f"down_blocks.{i}.resnets.{j}" for j in range(n)]
    if "CrossAttn" in t:
      names += [f"down_blocks.{i}.attentions.{j}" for j in range(n)]
  mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
  if mid:
    names += ["mid_block.resnets.0", "mid_block.resnets.1"]
    if "CrossAttn" in mid:
      names.append("mid_block.attentions.0")
  for i, t in enumerate(unet_config.get("up_block_types", ())):
    names += [f"up_blocks.{i}.resnets.{j}" for j in range(n + 1)]
    if "CrossAttn" in t:
      names += [f"up_blocks.{i}.attentions.{j}" for j in range(n + 1)]
  return names


def check_model(config, block_fields=("block", "style_block")) -> None:
  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "model.weights", WEIGHTS)
  path = model_dir(config)
  if path is None:
    return
  if config.get("dry_run") and not os.path.isfile(os.path.join(path, "unet", "config.json")):
    path = layout.model_config_dir(config)  # SD v1.5's shipped config files (the tiny pipeline's: written later)
    if not os.path.isdir(path):
      return
  if not os.path.isdir(path):
    _fail("model.path", config.model.path, "no such folder",
          "give a local diffusers-format directory (unet/, text_encoder/, tokenizer/, scheduler/)")
  unet_cfg = os.path.join(path, "unet", "config.json")
  if not os.path.isfile(unet_cfg):
    _fail("model.path", config.model.path, "not a diffusers pipeline folder (no unet/config.json)")
  with open(unet_cfg) as f:
    valid = unet_blocks(json.load(f))
  for field in block_fields:
    b = config.get(field, "")
    if b and b not in valid:
      attn = [v for v in valid if ".attentions." in v]
      _fail(field, b, "not a block of this UNet", f"its attention blocks: {', '.join(attn)}")


def check_sampler(config) -> None:
  _positive(config, "sampler.num_steps", "sampler.batch_size")
  _non_negative(config, "sampler.height", "sampler.width", "sampler.guidance_scale")
  for f in ("sampler.height", "sampler.width"):
    v = _get(config, f)
    if v % 8:
      _fail(f, v, "must be a multiple of 8 (0 = the model's default size)")


def check_concepts(config) -> None:
  c = config.concepts
  for field in ("objects", "styles"):
    names = list(c[field])
    if field == "objects" and not names:
      _fail("concepts.objects", names, "is empty", "list the object names of the prompt grid")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      _fail(f"concepts.{field}", dup, "names appear twice")
  if "{object}" not in c.style_template or "{style}" not in c.style_template:
    _fail("concepts.style_template", c.style_template, "must contain {object} and {style}")


def known_concepts(config, field: str, domain: str) -> None:
  names = list(config.concepts.objects if domain == "object" else config.concepts.styles)
  for n in _get(config, field):
    if n not in names:
      close = difflib.get_close_matches(n, names, n=3)
      _fail(field, n, f"unknown {domain}",
            f"did you mean {', '.join(close)}?" if close else f"known {domain}s: {', '.join(names)}")


# ------------------------------------------------------------------ files


def store_dir(config) -> str:
  return layout.store_path(config)


def store_manifest(config) -> dict:
  path = store_dir(config)
  mpath = os.path.join(path, "manifest.json")
  field = "collect.store_path" if config.collect.store_path else "workdir"
  for p in (path, config.workdir):
    if os.path.exists(p) and not os.path.isdir(p):
      _fail(field, _get(config, field), f"{p} is a file, not a folder",
            "give a folder (the store is a folder with manifest.json)")
  if not os.path.isfile(mpath):
    raise ConfigError(f"no activation store at {path}: run `python -m saemnesia_jax.collect` with the same "
                      "--config (and --config.workdir / --config.collect.store_path) first")
  try:
    with open(mpath) as f:
      m = json.load(f)
  except ValueError as e:
    _fail(field, _get(config, field), f"{mpath} is truncated or not JSON ({e})",
          "collect the store again into a new path (python -m saemnesia_jax.collect)")
  if (not isinstance(m, dict) or not isinstance(m.get("layout"), dict) or "d_in" not in m["layout"]
      or not isinstance(m.get("identity"), dict)):
    _fail(field, _get(config, field), f"{mpath} is not an activation store manifest (no identity / layout)",
          "collect the store again (python -m saemnesia_jax.collect), or point to another store")
  return m


def sae_cfg(field: str, path: str) -> dict:
  cfg = os.path.join(path, "cfg.json")
  if not os.path.isfile(cfg):
    _fail(field, path, "no SAE there (no cfg.json)",
          "train one first (python -m saemnesia_jax.train) or point to a sparsify-layout SAE folder")
  with open(cfg) as f:
    return json.load(f)


# ----------------------------------------------------------------- stages


def non_empty_prompts(config, field: str) -> None:
  for p in _get(config, field):
    if not str(p).strip():
      _fail(field, tuple(_get(config, field)), "holds an empty prompt", "give each prompt some words")


def json_file(field: str, path: str) -> Any:
  """The object of a JSON file a field names; ConfigError if it is truncated or not JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    _fail(field, path, f"not a readable JSON file ({type(e).__name__}: {str(e).splitlines()[0]})",
          "it is truncated or not JSON: write it again, or give another file")


def _sample(config) -> None:
  check_model(config, block_fields=())
  check_sampler(config)
  if not config.prompts:
    _fail("prompts", tuple(config.prompts), "is empty", "e.g. --config.prompts=\"('A cat image in neon style.',)\"")
  non_empty_prompts(config, "prompts")
  if not config.seeds:
    _fail("seeds", tuple(config.seeds), "is empty", "e.g. --config.seeds=\"(188,)\"")


def _collect(config) -> None:
  c = config.collect
  if c.anchor_prompts_dir and not config.get("dry_run"):  # a placeholder path fails first, in a second
    missing = [o for o in config.concepts.objects
               if not os.path.isfile(os.path.join(c.anchor_prompts_dir, ANCHOR_FILE.format(object=o)))]
    if missing:
      _fail("collect.anchor_prompts_dir", c.anchor_prompts_dir,
            f"has no {ANCHOR_FILE.format(object=missing[0])} (missing for {len(missing)} of "
            f"{len(config.concepts.objects)} objects)",
            "point it at UnlearnCanvas' anchor_prompts/finetune_prompts folder, or '' to collect on the concept grid")
  check_model(config)
  check_sampler(config)
  check_concepts(config)
  if not c.seeds:
    _fail("collect.seeds", tuple(c.seeds), "is empty", "give at least one seed")
  _one_of(config, "collect.dtype", ("bfloat16", "float16"))
  _one_of(config, "collect.compression", STORE_COMPRESSIONS)
  _non_negative(config, "collect.process_count", "collect.max_units")
  if c.process_index >= 0 and c.process_count and c.process_index >= c.process_count:
    _fail("collect.process_index", c.process_index, f"must be < collect.process_count={c.process_count}")


def per_block(config) -> list:
  """The config of each hooked block (one, or the object and the style block)."""
  try:
    return [blocks.block_config(config, b) for b in blocks.blocks(config)]
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _probe(config) -> None:
  _positive(config, "probe.steps", "probe.batch_size", "probe.learning_rate")
  _fraction(config, "probe.val_fraction", lo_open=True)
  for c in per_block(config):
    store_manifest(c)


def _train(config) -> None:
  s, t = config.sae, config.train
  _one_of(config, "sae.mode", ("unsupervised", "supervised"))
  for field, ok in (("matmul_dtype", ("", "bfloat16")), ("selection", ("auto", "exact", "threshold"))):
    if field in config.sae:
      _one_of(config, f"sae.{field}", ok)
  _one_of(config, "sae.sup_loss", ("bce", "softmax"))
  _positive(config, "sae.k", "sae.expansion_factor", "train.steps", "train.batch_size",
            "train.learning_rate", "train.log_every", "train.eval_every", "train.ckpt_every",
            "train.keep_checkpoints", "train.patience", "train.init_tokens", "train.buffer_chunks",
            "train.val_batches")
  _non_negative(config, "sae.n_latents", "sae.d_in", "sae.k_aux", "sae.auxk_alpha", "sae.dead_tokens",
                "sae.w_sup", "sae.w_l1", "sae.w_decorr", "train.grad_clip", "train.adam_eps",
                "train.final_lr_fraction", "train.stop_after")
  _one_of(config, "train.lr_decay", ("linear", "constant"))
  _one_of(config, "train.batch_from", ("tokens", "maps"))
  _fraction(config, "train.val_fraction")
  layout.check_name("train.name", t.name)
  if s.sparse_decode and s.batch_topk:
    _fail("sae.sparse_decode", True, "needs per-token TopK", "set --config.sae.batch_topk=False")
  n = _process_count()
  if t.batch_size % n:
    _fail("train.batch_size", t.batch_size, f"must be divisible by the {n} processes")
  if s.mode == "supervised" and s.assignment not in ("greedy", "random") and not os.path.isfile(s.assignment):
    _fail("sae.assignment", s.assignment, "no such file", "use greedy, random or the path of an assignment.json")
  if config.get("dry_run"):
    return  # sizing needs no store: the width comes from the model's config when none exists
  for c in per_block(config):
    d_in = store_manifest(c)["layout"]["d_in"]
    if s.d_in and s.d_in != d_in:
      _fail("sae.d_in", s.d_in, f"the store holds activations of width {d_in}", "set it to 0 (= the store's)")
    latents = s.n_latents or d_in * s.expansion_factor
    if s.k > latents:
      _fail("sae.k", s.k, f"more than the SAE's {latents} latents", "lower sae.k or raise sae.n_latents")
    if s.mode == "supervised" and s.assignment == "greedy":
      path = os.path.join(layout.scores_dir_for_assignment(c), "assignment.json")
      if not os.path.isfile(path):
        _fail("sae.assignment", "greedy", f"no {path}",
              "run the scores stage on the unsupervised SAE first, or use --config.sae.assignment=random")
    if c.sae.init_from:
      cfg = sae_cfg("sae.init_from", c.sae.init_from)
      if cfg.get("d_in", d_in) != d_in:
        _fail("sae.init_from", c.sae.init_from, f"an SAE of width {cfg.get('d_in')}, the store's is {d_in}")


def _scores(config) -> None:
  _positive(config, "scores.batch_size", "scores.mass_fraction")
  _one_of(config, "scores.split", ("all", "train", "val"))
  if config.scores.mass_fraction > 1:
    _fail("scores.mass_fraction", config.scores.mass_fraction, "must be in (0, 1]")
  for c in per_block(config):
    sae_cfg("scores.sae_dir", layout.scores_sae_dir(c))
    store_manifest(c)


def _evaluate(config) -> None:
  ev = config.evaluate
  check_model(config)
  check_sampler(config)
  check_concepts(config)
  methods = ("none", "saeuron", "saemnesia")
  for m in ev.methods:
    if m not in methods:
      _fail("evaluate.methods", tuple(ev.methods), f"unknown method {m!r}", f"known: {', '.join(methods)}")
  known_concepts(config, "evaluate.objects", "object")
  known_concepts(config, "evaluate.styles", "style")
  known_concepts(config, "evaluate.sequential_objects", "object")
  for f in ("evaluate.gammas", "evaluate.sweep_seeds", "evaluate.eval_seeds"):
    if not _get(config, f):
      _fail(f, tuple(_get(config, f)), "is empty")
  if "saeuron" in ev.methods:
    if not ev.percentiles:
      _fail("evaluate.percentiles", (), "is empty", "SAeUron selects latents by score percentile")
    for p in ev.percentiles:
      if not 0 < p < 100:
        _fail("evaluate.percentiles", tuple(ev.percentiles), "each must be in (0, 100)")
  _positive(config, "evaluate.max_latents")
  variants.variants(config)
  if ev.chosen_from and not os.path.isfile(ev.chosen_from):
    _fail("evaluate.chosen_from", ev.chosen_from, "no such file",
          "give an earlier evaluation's summary.json (or chosen.json), or '' to sweep")
  if set(ev.rule_seeds) & set(ev.eval_seeds):  # recognised_confidence: the schema's range
    _fail("evaluate.rule_seeds", tuple(ev.rule_seeds), f"overlaps evaluate.eval_seeds={tuple(ev.eval_seeds)}",
          "choose the rule on seeds the table does not report")
  _one_of(config, "evaluate.classifier", ("canvas_mini", "canvas_mini_no_object", "unlearncanvas"))
  if config.get("dry_run"):
    return  # sizing the sampler needs no SAE, scores or classifiers
  if ev.classifier == "unlearncanvas" and not os.path.isdir(ev.classifier_dir):
    _fail("evaluate.classifier_dir", ev.classifier_dir, "no such folder",
          "give the folder with style_classifier.pth and object_classifier.pth")
  method_inputs(config, ev.methods)


def _unlearn(config) -> None:
  u = config.unlearn
  check_model(config)
  check_sampler(config)
  if not u.concepts:
    _fail("unlearn.concepts", tuple(u.concepts), "is empty", "e.g. --config.unlearn.concepts=\"('Disk',)\"")
  names = list(config.concepts.objects) + list(config.concepts.styles)
  low = [n.lower() for n in names]
  for c in u.concepts:
    if c.lower() not in low:
      close = difflib.get_close_matches(c, names, n=3)
      _fail("unlearn.concepts", c, "not a concept of config.concepts",
            f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names)}")
  for m in u.methods:
    if m not in ("saemnesia", "saeuron"):
      _fail("unlearn.methods", tuple(u.methods), f"unknown method {m!r}", "known: saemnesia, saeuron")
  if u.gamma > 0:
    _fail("unlearn.gamma", u.gamma, "must be negative (0 = each concept's chosen gamma)")
  if not u.seeds:
    _fail("unlearn.seeds", tuple(u.seeds), "is empty")
  non_empty_prompts(config, "unlearn.prompts")
  if u.chosen:
    if not os.path.isfile(u.chosen):
      _fail("unlearn.chosen", u.chosen, "no such file",
            "give a chosen.json or an evaluation's summary.json, or '' to use the one beside the SAEs")
    json_file("unlearn.chosen", u.chosen)
  for m, (sae_dir, scores_dir) in layout.unlearn_sources(config).items():
    field = "unlearn.sae_dir" if u.sae_dir else "unlearn.sae_root"
    if not os.path.isfile(os.path.join(sae_dir, "cfg.json")):
      _fail(field, u[field.split(".")[1]], f"no {m} SAE at {sae_dir} (no cfg.json)",
            "train one (python -m saemnesia_jax.train) or point unlearn.sae_root at a folder with "
            "sae_unsup/ and sae_sup/")
    field = "unlearn.scores_dir" if u.scores_dir else "unlearn.sae_root"
    if not os.path.isfile(os.path.join(scores_dir, "scores.npz")):
      _fail(field, u[field.split(".")[1]], f"no {m} scores at {scores_dir} (no scores.npz)",
            "run python -m saemnesia_jax.scores on that SAE first")


def method_inputs(config, methods) -> None:
  """Each SAE method's SAE and scores (evaluate.<method>_sae / _scores) exist, per block."""
  for c in per_block(config):
    for m in (m for m in layout.RUN_OF_METHOD if m in methods):
      sae_cfg(f"evaluate.{m}_sae", layout.method_sae(c, m))
      if not os.path.isfile(os.path.join(layout.method_scores(c, m), "scores.npz")):
        _fail(f"evaluate.{m}_scores", layout.method_scores(c, m), "no scores.npz there",
              "run python -m saemnesia_jax.scores on that SAE first")


def _attack(config) -> None:
  a, ev = config.attack, config.evaluate
  check_model(config)
  check_sampler(config)
  check_concepts(config)
  for m in a.methods:
    if m not in ("none", "saeuron", "saemnesia"):
      _fail("attack.methods", tuple(a.methods), f"unknown method {m!r}", "known: none, saeuron, saemnesia")
  if not a.methods:
    _fail("attack.methods", (), "is empty")
  known_concepts(config, "attack.objects", "object")
  known_concepts(config, "attack.styles", "style")
  _positive(config, "attack.prompts", "attack.prefix_tokens", "attack.steps", "attack.learning_rate",
            "attack.timesteps_per_step", "attack.check_timesteps")
  _non_negative(config, "attack.weight_decay", "attack.check_every", "attack.stop_after")
  if not a.target_seeds:
    _fail("attack.target_seeds", (), "is empty", "give the seeds of the base model's samples the attack denoises")
  judged = set(a.seeds or ev.eval_seeds) | set(ev.sweep_seeds)
  overlap = sorted(set(a.target_seeds) & judged)
  if overlap:
    _fail("attack.target_seeds", tuple(a.target_seeds), f"seeds {overlap} are also judged (evaluate.sweep_seeds, "
          "evaluate.eval_seeds or attack.seeds)", "the targets must be images the evaluation never sees")
  if config.get("dry_run"):
    return
  if any(m != "none" for m in a.methods) and not os.path.isfile(layout.attack_chosen(config)):
    _fail("attack.chosen_from", a.chosen_from, f"no chosen settings at {layout.attack_chosen(config)}",
          "run the evaluate stage first, or give an evaluation's summary.json / chosen.json")
  method_inputs(config, a.methods)


# ----------------------------------------------------------- writable


def writable(stage: str, config) -> None:
  """Refuses a stage whose output folder cannot be written (``io_utils.read_only``), before any work."""
  if stage not in layout.OUTPUTS or config.get("dry_run"):
    return
  field, path = layout.OUTPUTS[stage](config)
  why = io_utils.read_only(path)
  if why:
    _fail(field, _get(config, field), f"{why}: the stage could not write {path}",
          "give a writable folder, or make it writable (chmod u+w)")


def _pipeline_check(config) -> None:
  unknown = [st for st in config.pipeline.stages if st not in registry.PIPELINE_STEPS]
  if unknown:
    _fail("pipeline.stages", tuple(config.pipeline.stages), f"unknown stages {unknown}",
          f"known: {', '.join(registry.PIPELINE_STEPS)}")
  _collect(config)  # the first stage's checks; each later stage checks its inputs when it starts


def _report(config) -> None:
  if not os.path.isdir(config.workdir):
    _fail("workdir", config.workdir, "no such folder", "run the stages (or python -m saemnesia_jax.pipeline) first")


def _ship_saes(config) -> None:
  for run in (layout.UNSUP_RUN, layout.SUP_RUN):
    if not os.path.isfile(os.path.join(layout.sae_export(config.workdir, run), "cfg.json")):
      _fail("workdir", config.workdir, f"no SAE in {run}/export", "run the pipeline on CanvasMini first")


def _build(config) -> None:
  _positive(config, "base_train.steps", "base_train.batch_size", "base_train.learning_rate")


CHECKS: dict[str, Callable[[Any], None]] = {
    "sample": _sample, "collect": _collect, "probe": _probe, "train": _train, "scores": _scores,
    "evaluate": _evaluate, "attack": _attack, "canvas_mini.build": _build, "unlearn": _unlearn, "pipeline": _pipeline_check,
    "report": _report, "canvas_mini.ship_saes": _ship_saes,
}

assert set(CHECKS) == set(registry.STAGES), "every registered stage has its checks"


def check(stage: str, config) -> None:
  """Raises ConfigError if ``config`` cannot run ``stage``; creates nothing."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"a config must be an ml_collections.ConfigDict, got a {type(config).__name__}")
  if not isinstance(config.workdir, str) or not config.workdir:
    _fail("workdir", config.workdir, "must be a folder path")
  if os.path.exists(config.workdir) and not os.path.isdir(config.workdir):
    _fail("workdir", config.workdir, "is a file, not a folder", "give a folder (it is made if missing)")
  schema.validate(config)  # every field's type, range and finiteness
  for field, value, why in protocol.check(config)[:1]:
    _fail(field, value, why)
  if config.get("topology"):
    topology.resolve(config.topology)  # a known slice name, or the list of them
    if not config.get("dry_run"):
      _fail("topology", config.topology, "compiles for a TPU slice from this host: a dry run only",
            "add --config.dry_run=True (or leave topology '' to run on the local devices)")
  writable(stage, config)
  CHECKS[stage](config)
