"""Stage `evaluate`: concept erasure with the latent clamp, measured by UA / IRA / CRA.

  python -m saemnesia_jax.evaluate --config configs/canvas_mini.py
  launch/local.sh 2 python -m saemnesia_jax.evaluate --config configs/canvas_mini.py   # 2 processes

For every concept to erase (objects and styles) and every method:

* ``none``: no erasure (the base model; every concept's UA is its miss rate);
* ``saeuron``: the unsupervised SAE, latents selected per timestep by
  importance-score percentile, sweep over percentile x gamma;
* ``saemnesia``: the supervised SAE, the latent it was trained to carry for the
  concept (its saemnesia.json assignment), sweep over gamma only.

the answer set (every object x style prompt and, with ``evaluate.seed_images``,
every object's unstyled prompt (UnlearnCanvas' Seed_Images); ``seeds``) is
sampled (``evaluate.num_steps`` DDIM steps) with the clamp inside the jitted
sampler, at ``config.block`` for objects and ``config.style_block`` for
styles, each with that block's SAEs (``diffusion/blocks.py``), classified by the style and object
classifiers, and scored (docs/method.md section 6). The sweep picks, per concept,
the setting with the best (UA + IRA) / 2 on ``sweep_seeds``; the table
reports that setting on the held-out ``eval_seeds``. Sequential unlearning
erases the first 1, 2, ..., n objects of ``sequential_objects`` at once,
each with its chosen setting.

Work is cut into units (method x concept x setting x seed set), each written
atomically when done (``runtime/units.py``): a rerun after a crash does only what is
missing, and several processes (``jax.distributed``; see launch/) split the
units by ``jax.process_index()``. Process 0 merges: ``{out_dir}/`` gets
``table.md`` / ``table.csv`` (Table 1 of docs/method.md), ``per_concept.csv``,
``sequential.md`` / ``.csv`` / ``.png``, ``trials.json`` and image grids of
the same prompts with and without erasure.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("evaluate")

import copy
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saemnesia_jax import judges
from saemnesia_jax.diffusion import blocks, clamp, erase
from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.diffusion import sampler as sampler_lib
from saemnesia_jax.evaluation import concepts
from saemnesia_jax.evaluation import images as img_utils
from saemnesia_jax.evaluation import intervals, metrics, protocol, quality
from saemnesia_jax.evaluation import plan as plan_lib
from saemnesia_jax.evaluation import variants as variants_lib
from saemnesia_jax.evaluation.plan import (arms, choose, choose_rules, final_unit, final_units,  # noqa: F401
                                           grid_arms, reported, reused_choices, rule_units, sequential_units,
                                           settings, sweep_units, targets, unit_metrics, unit_quality)
from saemnesia_jax.runtime import layout, runs, sizing
from saemnesia_jax.runtime import units as units_lib
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, atomic_write_json, hash_files, read_json
from saemnesia_jax.sae import artifacts, objectives

METHODS = ("none", "saeuron", "saemnesia")
# Fields that cannot change a unit's result: paths (their contents are
# fingerprinted as inputs), batching, output options.
NOT_RESULT = ("evaluate.out_dir", "evaluate.saeuron_sae", "evaluate.saeuron_scores", "evaluate.saemnesia_sae",
              "evaluate.saemnesia_scores", "evaluate.classifier_dir", "evaluate.grids", "evaluate.grid_rows",
              "evaluate.max_latents",
              "evaluate.recognised_confidence", "evaluate.chosen_from",
              "sampler.batch_size", "model.path", "model.weights", "model.seed")
# Units are keyed by their concept, setting and seeds: a changed grid adds units,
# and so does another chosen_from file (a changed choice is a new final unit).
CONTINUABLE = ("evaluate.methods", "evaluate.variants", "evaluate.objects", "evaluate.styles", "evaluate.gammas",
               "evaluate.percentiles", "evaluate.sweep_seeds", "evaluate.eval_seeds", "evaluate.rule_seeds",
               "evaluate.sequential", "evaluate.sequential_objects", "input:chosen_from")


def saemnesia_assignment(meta: dict | None, tables: dict, how: str, sae_dir: str = "") -> np.ndarray:
  """The concept -> latent ids (objects then styles) that SAEmnesia clamps.

  ``how='trained'``: the assignment the supervised SAE was trained to carry
  (its saemnesia.json), as the paper erases a concept by its own latent.
  ``'rescored'``: the greedy rule applied again to the supervised SAE's
  importance scores (scores.npz's ``assignment``); with BCE the two differ
  for most concepts.
  """
  if how == "trained":
    a = (meta or {}).get("assignment")
    if a is None:
      raise ValueError(f"the SAEmnesia SAE at {sae_dir} records no trained assignment (saemnesia.json "
                       "'assignment'): point config.evaluate.saemnesia_sae at a supervised export, or set "
                       "--config.evaluate.saemnesia_assignment=rescored")
    return np.asarray(a, np.int32)
  if how == "rescored":
    if "assignment" not in tables:
      raise ValueError("the SAEmnesia scores hold no assignment: rerun the scores stage")
    return np.asarray(tables["assignment"], np.int32)
  raise ValueError(f"config.evaluate.saemnesia_assignment={how!r}; expected 'trained' or 'rescored'")


def sampling_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the evaluation's step count: ``evaluate.num_steps`` (the
  protocol samples 100 DDIM steps, collection 50; 0 keeps ``sampler.num_steps``)."""
  n = int(config.evaluate.num_steps)
  if n < 0:
    raise ValueError(f"config.evaluate.num_steps={n}: give a step count, or 0 for config.sampler.num_steps")
  if not n or n == config.sampler.num_steps:
    return config
  out = copy.deepcopy(config)
  out.sampler.num_steps = n
  return out


class Evaluation:
  """Model, samplers, SAEs, scores and classifiers of one evaluation run."""

  def __init__(self, config: ml_collections.ConfigDict, judge: Any = None):
    self.config, ev = config, config.evaluate
    self.pipe = common.load_model(protocol.sampling_model(config))  # evaluate.dtype
    self.judge = judge or judges.make_judge(config)
    grid = protocol.evaluation_grid(config)  # evaluate.style_prompt / unstyled_prompt
    self.objects, self.styles = list(config.concepts.objects), list(config.concepts.styles)
    self.prompts = [p.prompt for p in grid]
    self.true_obj = np.array([p.object_id for p in grid], np.int32)
    self.true_sty = np.array([p.style_id for p in grid], np.int32)
    for m in ev.methods:
      if m not in METHODS:
        raise ValueError(f"unknown method {m!r} in config.evaluate.methods; known: {METHODS}")
    # A block per domain (config.style_block): each block's SAEs and scores, from its own folder.
    self.domain_block = blocks.domain_blocks(config)
    self.by_block = {b: self._load_methods(blocks.block_config(config, b), b) for b in blocks.blocks(config)}
    self.methods = self.by_block[config.block]  # the object block's (with one block, the only ones)
    self._samplers: dict[tuple[str, int], Any] = {}
    self.max_latents = int(ev.max_latents)  # clamp entries; grows if a unit selects more
    # Any SAE will do for the no-erasure runs: an empty clamp is exact.
    any_sae = next(iter(self.methods.values()), None)
    self._identity = any_sae

  def _load_methods(self, config: ml_collections.ConfigDict, block: str) -> dict:
    """method -> {params, k, scores, assignment} of one block's SAEs."""
    ev, out = config.evaluate, {}
    for m in ev.methods:
      if m == "none":
        continue
      sae_dir = layout.method_sae(config, m)
      params, cfg, meta = artifacts.load_sae(sae_dir, field=f"evaluate.{m}_sae")
      if (meta or {}).get("block") not in (None, block):
        raise ValueError(f"the {m} SAE at {sae_dir} was trained at block {meta['block']!r}, but this evaluation "
                         f"clamps at {block!r} (config.block / config.style_block): point "
                         f"config.evaluate.{m}_sae at that block's SAE")
      scores_dir = layout.method_scores(config, m)
      tables = artifacts.load_scores(scores_dir)
      out[m] = dict(params=jax.tree_util.tree_map(np.asarray, params), k=int(cfg["k"]), scores=tables,
                    identity={"sae": runs.sae_hash(sae_dir),  # for the run fingerprint
                              "scores": hash_files([os.path.join(scores_dir, "scores.npz")])})
      if m == "saemnesia" and protocol.value(config, "evaluate.saemnesia_selection") == "assigned":
        out[m]["assignment"] = saemnesia_assignment(meta, tables, ev.saemnesia_assignment, sae_dir)
    return out

  def sae(self, method: str, domain: str) -> dict:
    """The SAE (params, k, scores, assignment) that erases ``domain``'s concepts."""
    return self.by_block[self.domain_block[domain]][method]

  def sampler(self, k: int, block: str = "", erasing: bool = True):
    """The evaluation's sampler with a clamp of top-k at ``block`` ('' -> config.block).

    ``erasing``: the clamp of the protocol (``evaluate.kept_error``,
    ``evaluate.sae_dtype``); False (no erasure) an exact identity, as the
    released code samples without a hook."""
    block = block or self.config.block
    kept, dtype = ((protocol.value(self.config, "evaluate.kept_error"),
                    protocol.value(self.config, "evaluate.sae_dtype")) if erasing else ("x_minus_xhat", "float32"))
    key = (block, k) if (kept, dtype) == ("x_minus_xhat", "float32") else (block, k, kept, dtype)
    if key not in self._samplers:
      config = sampling_config(self.config)
      if block != config.block:
        config = copy.deepcopy(config)
        config.block = block
      self._samplers[key] = common.make_sampler(config, self.pipe, edit_fn=clamp.make_edit_fn(k, kept, dtype))
    return self._samplers[key]

  # ---------------------------------------------------------------- specs

  def concept_index(self, domain: str, name: str) -> int:
    names = self.objects if domain == "object" else self.styles
    return concepts.lookup(name, names, domain)

  def entry(self, method: str, domain: str, name: str, setting: dict) -> clamp.Entry:
    sae = self.sae(method, domain)
    return erase.concept_entry(method, sae["scores"], domain, self.concept_index(domain, name), setting,
                               assignment=sae.get("assignment"))

  def spec(self, method: str, erase: list[tuple[str, str, dict]], sampler) -> clamp.ClampSpec:
    n_steps = len(sampler.timesteps)
    if method == "none":
      return clamp.empty_spec(n_steps, self.max_latents)
    where = {self.domain_block[d] for d, _, _ in erase}
    if len(where) > 1:
      raise ValueError(f"one clamp erases concepts of both domains, which are hooked at different blocks {where}")
    entries = [self.entry(method, d, n, s) for d, n, s in erase]
    m = sum(len(e.latents) for e in entries)
    if m > self.max_latents:
      # Sequential unlearning of many concepts can select more latents than
      # the sweep did: grow the spec (one more compile) rather than fail late.
      grown = 1 << (m - 1).bit_length()
      print(f"the clamp selects {m} latents; max_latents {self.max_latents} -> {grown} (one more compile)")
      self.max_latents = grown
    timesteps = self.sae(method, erase[0][0])["scores"]["timesteps"] if erase else \
        self.methods[method]["scores"]["timesteps"]
    return clamp.build_spec(entries, sampler.timesteps, timesteps, self.max_latents)

  # ---------------------------------------------------------------- units

  def run_unit(self, unit: dict) -> dict:
    """Samples and classifies the answer set of one unit."""
    t0 = time.perf_counter()
    method = unit["method"]
    domain = unit.get("domain", "object")  # sequential units erase objects; 'none' erases nothing
    sae_m = self.sae(method, domain) if method != "none" else self._identity
    if sae_m is None:
      raise ValueError("evaluate needs at least one SAE method (saeuron or saemnesia) besides 'none'")
    sampler = (self.sampler(sae_m["k"], self.domain_block[domain]) if method != "none"
               else self.sampler(sae_m["k"], erasing=False))
    erase = [(d, n, s) for d, n, s in unit.get("erase", [])]
    spec = self.spec(method, erase, sampler)
    seeds = list(unit["seeds"])
    prompts = [p for p in self.prompts for _ in seeds]
    seed_list = protocol.noise_seeds(self.config, len(self.prompts), seeds)  # evaluate.noise
    imgs = sampler_lib.sample_prompts(sampler, prompts, seed_list, self.config.sampler.guidance_scale,
                          edit_params=(sae_m["params"], spec), progress=False)
    imgs = protocol.judged_images(self.config, imgs)  # evaluate.jpeg_quality
    out = {}
    if hasattr(self.judge, "assess"):  # ids, confidences and features: the quality measures too
      a = self.judge.assess(imgs)
      pred_obj, pred_sty = a["object"], a["style"]
      out = {"conf_object": np.round(a["object_conf"], 4).tolist(),
             "conf_style": np.round(a["style_conf"], 4).tolist()}
      if unit["phase"] == "final":  # the FD's inputs; float16 keeps a unit's file small
        out[units_lib.ARRAYS] = {"features": a["features"].astype(np.float16)}
    else:
      pred_obj, pred_sty = self.judge.predict(imgs)
    return {"pred_object": np.asarray(pred_obj).tolist(), "pred_style": np.asarray(pred_sty).tolist(),
            "true_object": np.repeat(self.true_obj, len(seeds)).tolist(),
            "true_style": np.repeat(self.true_sty, len(seeds)).tolist(),
            "wall_s": time.perf_counter() - t0, **out}


def fingerprint(config, ctx: Evaluation) -> dict:
  """What determines every unit's result (see runtime/runs.py): the settings, the
  model's weights, each block's SAEs and scores, and the judge."""
  inputs = {"weights": ctx.pipe.weights_hash(),
            "judge": getattr(ctx.judge, "identity", type(ctx.judge).__name__)}
  if config.evaluate.get("chosen_from"):
    inputs["chosen_from"] = hash_files([config.evaluate.chosen_from])
  for block, methods in ctx.by_block.items():
    for m, sae in methods.items():
      inputs.update({f"{block}/{m}_{k}": v for k, v in sae["identity"].items()})
  sections = ("model", "block", "style_block", "sampler", "concepts", "evaluate")
  fp = runs.make(config, sections, NOT_RESULT + protocol.raw_fields(config, sections), inputs, stage="evaluate")
  fp["settings"].update(protocol.settings(config, sections))  # the resolved protocol, where not the project's
  return fp


def keep_dropped_inputs(out_dir: str, fp: dict, methods) -> dict:
  """``fp`` with the SAE and score hashes that ``out_dir``'s record holds for
  methods left out of ``methods``: their units stay in ``units/``, so leaving
  a method out continues the folder, and adding it back continues only with
  the same SAEs."""
  path = os.path.join(out_dir, runs.FILE)
  if not os.path.isfile(path):
    return fp
  dropped = [m for m in METHODS if m != "none" and m not in methods]
  old = read_json(path).get("inputs", {})
  kept = {k: v for k, v in old.items() if any(k.rsplit("/", 1)[-1].startswith(f"{m}_") for m in dropped)}
  return {**fp, "inputs": {**fp["inputs"], **kept}}


# ------------------------------------------------------------------ report


def report(config, results: units_lib.UnitResults, chosen, finals, seqs, out_dir: str, rules: dict | None = None,
           devs=()) -> dict:
  ev = config.evaluate
  rows, per_concept, wall, qual, answers = {}, [], {}, {}, {}
  base = next((u for u in finals if u["method"] == "none"), None)
  rows_kept = {label for label, _, _ in chosen}  # with a rule choice: the papers' rows and the chosen ones
  labels = (["none"] if "none" in ev.methods else []) + [v.label(m) for m, v in arms(config)
                                                         if v.label(m) in rows_kept]
  for m in labels:
    concept_rows = []
    for d, n in targets(config):
      u = base if m == "none" else final_unit(config, m, d, n, chosen[(m, d, n)])
      r = results.read(u)
      answers.setdefault(m, []).append((d, n, r))  # the bootstrap's images (evaluation/intervals.py)
      met = unit_metrics(r, d, [n], config)
      q = unit_quality(config, results, u, base, d, n)
      concept_rows.append({"domain": d, **met})
      per_concept.append({"method": m, "domain": d, "concept": n, **met, **q,
                          "setting": chosen.get((m, d, n), {})})
    rows[m] = metrics.average_table(concept_rows)
    by_domain = {d: quality.mean_rows([p for p in per_concept if p["method"] == m and p["domain"] == d])
                 for d in ("object", "style")}
    if any(by_domain.values()):
      qual[m] = by_domain
  for u in sweep_units(config) + list(devs) + finals:
    wall[u["method"]] = wall.get(u["method"], 0.0) + results.read(u)["wall_s"]
  trials = {v.label(m): len(settings(config, m, v)) for m, v in arms(config)}  # per object
  totals = {v.label(m): sum(len(settings(config, m, v, d)) for d, _ in targets(config)) for m, v in arms(config)}
  headline = (rules or {}).get("chosen", {})  # with a rule choice: the chosen rows are compared
  unc = plan_lib.uncertainty(config, answers, rows, (headline.get("saemnesia", "saemnesia"),
                                                     headline.get("saeuron", "saeuron")))  # 95%; paired
  metrics.write_table(os.path.join(out_dir, "table"), rows, intervals=unc["intervals"],
                      footer=intervals.difference_text(unc))
  # What each row cost: sweep trials (per concept and in all); sampling + judging time per method.
  cost = ["| method | trials per concept | trials | wall of the method's units (min) |", "|---|---|---|---|"]
  cost += [f"| {m} | {trials.get(m, 0)} | {totals.get(m, 0)} | "
           f"{wall.get(variants_lib.method_of(m), 0.0) / 60:.1f} |" for m in labels]
  cost += ["", f"Each trial is one answer set per sweep seed {tuple(ev.sweep_seeds)}, pooled; "
           f"the table is on the held-out seeds {tuple(ev.eval_seeds)}."]
  reused = sorted({label for label, _, _ in reused_choices(config)})
  if reused:
    cost += ["", f"Chosen by the sweep of {ev.chosen_from} (same grid; not rerun here): {', '.join(reused)}"]
  vs = variants_lib.variants(config)
  if len(vs) > 1:
    cost += ["", "Rules: " + "; ".join(f"[{v.name or 'paper'}] {variants_lib.describe(v, ev.gammas)}" for v in vs)]
  edges = plan_lib.edge_choices(config, chosen)
  cost += ["", "Choices at an edge of the row's gamma grid (the grid may be too narrow for them): "
           + "; ".join(f"{label} {len(e)} of {len(targets(config))}" + (f" ({', '.join(e)})" if e else "")
                       for label, e in edges.items())]
  if rules:
    cost += ["", f"Rule chosen per method by the Table-1 average on the development seeds {tuple(ev.rule_seeds)} "
             "(the table reports the chosen row and the papers' rule, on the held-out seeds):", "",
             "| row | avg on the development seeds | chosen |", "|---|---|---|"]
    cost += [f"| {label} | {100 * a:.2f} | {'yes' if label in rules['chosen'].values() else ''} |"
             for label, a in rules["avg"].items()]
  atomic_write_bytes(os.path.join(out_dir, "cost.md"), ("\n".join(cost) + "\n").encode())
  seq_rows = {}
  for u in seqs:
    met = unit_metrics(results.read(u), "object", u["objects"], config)
    seq_rows.setdefault(u["method"], []).append({"n": u["n"], **met})
  if seq_rows:
    flat = {f"{m} n={r['n']}": r for m, rs in seq_rows.items() for r in rs}
    metrics.write_table(os.path.join(out_dir, "sequential"), flat, columns=("UA", "IRA", "CRA"))
    metrics.plot_sequential(os.path.join(out_dir, "sequential.png"), seq_rows)
  if qual:
    atomic_write_bytes(os.path.join(out_dir, "quality.md"), quality.format_markdown(qual).encode())
  summary = {"table": rows, "intervals": unc["intervals"], "difference": unc["difference"],
             "bootstrap": {k: unc[k] for k in ("n_boot", "level", "eval_seeds", "pair")},
             "per_concept": per_concept, "sequential": seq_rows, "quality": qual,
             "trials_per_concept": trials,
             "trials_total": totals,
             "wall_s": wall, "chosen": {"/".join(k): v for k, v in chosen.items()},
             "rules": rules or {}, "headline": headline, "edge_choices": edges}
  # A table cell without images, or no difference to separate, is NaN / inf: null in the JSON.
  atomic_write_json(os.path.join(out_dir, "summary.json"), summary, nonfinite_as_null=True)
  return summary


def _grid_prompts(config, domain: str, name: str, n_with: int, n_without: int) -> list[str]:
  """Prompts for one erased concept: ``n_with`` that contain it, then ``n_without`` that do not."""
  objs, stys = list(config.concepts.objects), list(config.concepts.styles)
  fmt = lambda o, s: protocol.styled_prompt(config, o, s)  # noqa: E731
  if domain == "object":
    other = objs[(objs.index(name) + 1) % len(objs)]
    return [fmt(name, s) for s in stys[:n_with]] + [fmt(other, s) for s in stys[:n_without]]
  other = stys[(stys.index(name) + 1) % len(stys)]
  return [fmt(o, name) for o in objs[:n_with]] + [fmt(o, other) for o in objs[:n_without]]


def erasure_grid(ev_ctx: Evaluation, chosen, out_dir: str, per_domain: int = 2) -> dict:
  """Rows: for a few erased concepts (``per_domain`` objects and styles), the
  same prompts without erasure and with each method's chosen erasure; the
  first (up to three) prompts contain the concept (they should lose it), the
  last (up to two) do not (they should not change)."""
  config = ev_ctx.config
  chosen_targets = targets(config)
  shown = ([t for t in chosen_targets if t[0] == "object"][:per_domain] +
           [t for t in chosen_targets if t[0] == "style"][:per_domain])
  seed = int(config.evaluate.eval_seeds[0])
  # Every row the same width, also with fewer than three concepts in a domain.
  n_with = min(3, len(config.concepts.objects), len(config.concepts.styles))
  n_without = min(2, n_with)
  prompts = {t: _grid_prompts(config, *t, n_with, n_without) for t in shown}
  identity = ev_ctx._identity
  sampler = ev_ctx.sampler(identity["k"], erasing=False)
  # No erasure: every concept's prompts in one batch.
  flat = [p for t in shown for p in prompts[t]]
  plain = sampler_lib.sample_prompts(sampler, flat, [seed] * len(flat), config.sampler.guidance_scale,
                         edit_params=(identity["params"], ev_ctx.spec("none", [], sampler)), progress=False)
  plain = plain.reshape(len(shown), -1, *plain.shape[1:])
  rows, labels = [], []
  for i, (domain, name) in enumerate(shown):
    rows.append(plain[i])
    labels.append(f"{name}: no erasure")
    for m, v in grid_arms(config):  # each method under the papers' rule, then under each variant
      label = v.label(m)
      if (label, domain, name) not in chosen:
        continue  # a rule not chosen on the development seeds
      sae_m = ev_ctx.sae(m, domain)
      s = ev_ctx.sampler(sae_m["k"], ev_ctx.domain_block[domain])
      spec = ev_ctx.spec(m, [(domain, name, chosen[(label, domain, name)])], s)
      rows.append(sampler_lib.sample_prompts(s, prompts[(domain, name)], [seed] * len(prompts[(domain, name)]),
                                 config.sampler.guidance_scale, edit_params=(sae_m["params"], spec),
                                 progress=False))
      labels.append(f"{name}: {label}")
  imgs = np.concatenate(rows)
  cols = [f"with {i + 1}" for i in range(n_with)] + [f"without {i + 1}" for i in range(n_without)]
  g = img_utils.grid(imgs, len(rows), len(cols), scale=img_utils.tile_scale(imgs.shape[1]),
                     row_labels=labels, col_labels=cols,
                     label_width=max(150, 7 * max(len(label) for label in labels)))
  path = os.path.join(out_dir, "erasure_grid.png")
  img_utils.save_image(path, g)
  return {"path": path, "rows": labels, "columns": cols}


# -------------------------------------------------------------------- run


def dry_run(config: ml_collections.ConfigDict, print_fn=print) -> dict:
  """Compiles the clamp sampler from the model's config files alone (``sizing``)."""
  pipe = common.load_model(config, abstract=True)
  cfg = sampling_config(config)
  sampler = common.make_sampler(cfg, pipe, edit_fn=clamp.make_edit_fn(config.sae.k))
  d_in = sampler.block_output_shape(config.block)[-1]
  L, m, n = objectives.n_latents(config, d_in), int(config.evaluate.max_latents), cfg.sampler.num_steps
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  sae = {"W_enc": f32(d_in, L), "b_enc": f32(L), "W_dec": f32(L, d_in), "b_dec": f32(d_in)}
  spec = clamp.ClampSpec(jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((n, m), bool),
                         f32(n, m), f32(n, m))
  return sizing.sampler_dry_run(config, "evaluate", pipe, sampler, (sae, spec), print_fn=print_fn)


def run(config: ml_collections.ConfigDict, judge: Any = None, progress: bool = True) -> dict | None:
  if config.get("dry_run"):  # compile only: per-device memory and images/s (runtime/sizing.py)
    return dry_run(config)
  units_lib.initialize_distributed()
  ev = config.evaluate
  out_dir = layout.eval_dir(config)
  targets(config)  # unknown concept names fail before any work (and before begin: no fingerprint.json left)
  grid_arms(config)  # so do unknown grid rows
  sweep = sweep_units(config)  # and sweep seeds, and a chosen_from file outside this grid
  ctx = Evaluation(config, judge)
  runs.begin(out_dir, keep_dropped_inputs(out_dir, fingerprint(config, ctx), ev.methods),
             overwrite=runs.overwrite(config), continuable=CONTINUABLE,
             fresh="--config.evaluate.out_dir=<new folder>", write=jax.process_index() == 0)
  units_lib.barrier("evaluate-fingerprint")  # process 0 may have deleted the old outputs
  t0 = time.perf_counter()
  root = os.path.join(out_dir, "units")
  results = units_lib.UnitResults(root)
  units_lib.run_units(root, sweep, ctx.run_unit, progress=progress)
  units_lib.barrier("evaluate-sweep")
  chosen = choose(config, results)
  devs = rule_units(config, chosen)  # with evaluate.rule_seeds: each method's rule, chosen on them
  units_lib.run_units(root, devs, ctx.run_unit, progress=progress)
  units_lib.barrier("evaluate-rules")
  rules = choose_rules(config, results, chosen) if devs else None
  chosen = reported(config, chosen, rules)
  finals = final_units(config, chosen)
  units_lib.run_units(root, finals, ctx.run_unit, progress=progress)
  seqs = sequential_units(config, chosen)
  units_lib.run_units(root, seqs, ctx.run_unit, progress=progress)
  units_lib.gather(root, sweep + devs + finals + seqs)
  if jax.process_index() != 0:
    return None
  summary = report(config, results, chosen, finals, seqs, out_dir, rules=rules, devs=devs)
  if ev.grids and "none" in ev.methods and ctx.methods:
    summary["erasure_grid"] = erasure_grid(ctx, chosen, out_dir)
  summary["wall_s_total"] = time.perf_counter() - t0
  print(metrics.format_markdown(summary["table"], intervals=summary["intervals"]))
  print(intervals.difference_text({**summary["bootstrap"], "difference": summary["difference"]}))
  if summary["quality"]:
    print("Image quality under erasure (FD: judge-feature Frechet distance to the same prompts unerased, "
          f"lower is better; recognised: the other domain's classifier at >= "
          f"{config.evaluate.recognised_confidence:g} confidence; coherent UA: erased and still recognised):")
    print(quality.format_markdown(summary["quality"]))
  print("trials per concept:", summary["trials_per_concept"], "total:", summary["trials_total"])
  print(f"wrote {out_dir}")
  return summary


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call: whether this process wrote the summary."""
  return run(config, judge=judge, progress=progress) is not None
