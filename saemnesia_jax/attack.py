"""Stage `attack`: does the erasure hold against an adversarial prompt? (UnlearnDiffAtk-style)

  python -m saemnesia_jax.attack --config configs/canvas_mini.py
  python -m saemnesia_jax.pipeline --config configs/canvas_mini.py \\
      --config.pipeline.stages="('collect','probe','train','scores','train_sup','scores_sup','evaluate','attack','report')"

For every erased concept (``attack.objects`` / ``attack.styles``; default the
evaluation's) and every method (``attack.methods``: none, saeuron,
saemnesia), each with the setting the evaluation chose for the concept
(``attack.chosen_from``, default the evaluation's summary.json):

1. targets: the base model's own samples (no erasure) of the concept's first
   ``attack.prompts`` prompts of the evaluation grid, at ``attack.target_seeds``
   (seeds the evaluation never judges);
2. for each prompt, ``attack.prefix_tokens`` tokens prepended to it are
   optimised (``diffusion/adversarial.py``: AdamW on their embeddings,
   projected onto the vocabulary, the erased model's own diffusion loss on the
   targets at random timesteps, the clamp active inside the jitted UNet call);
3. the prompts without and with their prefix are sampled with the same clamp
   at ``attack.seeds`` (default the evaluation's held-out seeds) and judged:
   an attacked image is a success when the judge names the erased concept.

Per concept and method: UA before the attack (1 - the share recognised
without the prefix), the attack success rate (ASR: the share recognised with
it, so UA after = 1 - ASR) with a 95% bootstrap interval over the images, and
the adversarial prompts as text. Per method: the mean over concepts with an
interval that resamples images within each concept (evaluation/intervals.py).
``none`` (no erasure) is the ceiling: how often the concept is drawn at all.

Work is cut into units, one per (method, concept) (``runtime/units.py``):
a rerun does only the missing ones and processes split them; the folder's
run fingerprint (``runtime/runs.py``) refuses other settings.
``{out_dir}/``: ``summary.json``, ``table.md``, ``prompts.json`` and
``grid.png`` (per concept and method, the unattacked then the attacked images).
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("attack")

import copy
import os
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saemnesia_jax import judges
from saemnesia_jax.diffusion import adversarial, blocks, clamp, erase
from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.diffusion.sampler import sample_prompts, sample_token_ids
from saemnesia_jax.evaluation import concepts, intervals, protocol
from saemnesia_jax.evaluation import images as img_utils
from saemnesia_jax.evaluation import variants
from saemnesia_jax.runtime import layout, runs
from saemnesia_jax.runtime import units as units_lib
from saemnesia_jax.runtime.errors import ConfigError
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, atomic_write_json, hash_files, read_json
from saemnesia_jax.sae import artifacts, objectives

METHODS = ("none", "saeuron", "saemnesia")
# Fields that cannot change a unit's result: paths (their contents are inputs), batching, output, interruption.
NOT_RESULT = ("attack.out_dir", "attack.chosen_from", "attack.grid", "attack.stop_after", "sampler.batch_size",
              "model.path", "model.weights", "model.seed", "evaluate.out_dir", "evaluate.saeuron_sae",
              "evaluate.saeuron_scores", "evaluate.saemnesia_sae", "evaluate.saemnesia_scores",
              "evaluate.classifier_dir", "evaluate.grids", "evaluate.grid_rows", "evaluate.chosen_from",
              "evaluate.recognised_confidence", "evaluate.variants", "evaluate.rule_seeds", "evaluate.gammas",
              "evaluate.percentiles", "evaluate.sweep_seeds", "evaluate.sequential", "evaluate.sequential_objects",
              "evaluate.saemnesia_percentiles", "evaluate.saeuron_style_setting")
# Units are keyed by method, concept, setting and seeds: more concepts or methods add units.
CONTINUABLE = ("attack.methods", "attack.objects", "attack.styles", "evaluate.methods", "evaluate.objects",
               "evaluate.styles", "input:chosen")


def targets(config) -> list[tuple[str, str]]:
  """(domain, name) of every attacked concept."""
  a, ev = config.attack, config.evaluate
  objs = list(a.objects) or list(ev.objects) or list(config.concepts.objects)
  stys = list(a.styles) or list(ev.styles) or list(config.concepts.styles)
  for n in objs:
    concepts.lookup(n, config.concepts.objects, "object")
  for n in stys:
    concepts.lookup(n, config.concepts.styles, "style")
  return [("object", n) for n in objs] + [("style", n) for n in stys]


def read_chosen(config) -> dict:
  path = layout.attack_chosen(config)
  if not os.path.isfile(path):
    raise ConfigError(f"no chosen settings at {path}: run the evaluate stage first, or give "
                      "--config.attack.chosen_from=<an evaluation's summary.json or chosen.json>")
  return variants.headline_choices(read_json(path))  # each method at its headline row's settings


def units(config, chosen: dict) -> list[dict]:
  """One unit per (method, concept): its setting, prompts and seeds."""
  a = config.attack
  seeds = [int(s) for s in (a.seeds or config.evaluate.eval_seeds)]
  grid = protocol.evaluation_grid(config)
  out = []
  for m in a.methods:
    for d, n in targets(config):
      key = erase.setting_key(m, d, n)
      if m != "none" and key not in chosen:
        raise ConfigError(f"{layout.attack_chosen(config)} holds no setting for {key}: evaluate that method and "
                          "concept first, or leave them out of config.attack")
      cid = concepts.lookup(n, config.concepts.objects if d == "object" else config.concepts.styles, d)
      prompts = [p.prompt for p in grid if (p.object_id if d == "object" else p.style_id) == cid][:int(a.prompts)]
      out.append({"phase": "attack", "method": m, "domain": d, "concept": n,
                  "setting": chosen.get(key, {}) if m != "none" else {}, "prompts": prompts, "seeds": seeds,
                  "target_seeds": [int(s) for s in a.target_seeds]})
  return out


class Attack:
  """Model, samplers, SAEs and the compiled attack of one run."""

  def __init__(self, config: ml_collections.ConfigDict, judge: Any = None):
    self.config = config
    self.pipe = common.load_model(protocol.sampling_model(config))  # evaluate.dtype
    self.judge = judge or judges.make_judge(config)
    self.domain_block = blocks.domain_blocks(config)
    self.saes: dict[tuple[str, str], dict] = {}
    for m in config.attack.methods:
      if m not in METHODS:
        raise ValueError(f"unknown method {m!r} in config.attack.methods; known: {METHODS}")
    # 'none' clamps nothing (an exact identity) but runs through the same sampler: any SAE of the block serves.
    erasing = [m for m in config.attack.methods if m != "none"] or [
        next((m for m in ("saemnesia", "saeuron") if os.path.isdir(layout.method_sae(config, m))), "saeuron")]
    for d in sorted({d for d, _ in targets(config)}):
      for m in erasing:
        self.saes[(m, d)] = self._load(m, d)
      self.saes.setdefault(("none", d), self.saes[(erasing[0], d)])
    self.max_latents = int(config.evaluate.max_latents)
    self._samplers, self._attacks, self._targets = {}, {}, {}

  def _load(self, method: str, domain: str) -> dict:
    block = self.domain_block[domain]
    c = blocks.block_config(self.config, block)
    sae_dir, scores_dir = layout.method_sae(c, method), layout.method_scores(c, method)
    params, cfg, meta = artifacts.load_sae(sae_dir)
    tables = artifacts.load_scores(scores_dir)
    assignment = None
    if method == "saemnesia" and protocol.value(self.config, "evaluate.saemnesia_selection") == "assigned":
      how = self.config.evaluate.saemnesia_assignment
      assignment = np.asarray((meta or {}).get("assignment") if how == "trained" else tables["assignment"], np.int32)
    return dict(params=jax.tree_util.tree_map(np.asarray, params), k=int(cfg["k"]), tables=tables,
                assignment=assignment, block=block,
                identity={"sae": runs.sae_hash(sae_dir), "scores": hash_files([os.path.join(scores_dir,
                                                                                             "scores.npz")])})

  def sae(self, method: str, domain: str) -> dict:
    return self.saes[(method, domain)]

  def sampler(self, k: int, block: str, erasing: bool):
    """The evaluation's clamp sampler (evaluate.num_steps, the protocol's kept error and SAE dtype)."""
    kept, dtype = ((protocol.value(self.config, "evaluate.kept_error"),
                    protocol.value(self.config, "evaluate.sae_dtype")) if erasing else ("x_minus_xhat", "float32"))
    key = (block, k, kept, dtype)
    if key not in self._samplers:
      c = copy.deepcopy(self.config)
      c.block = block
      c.sampler.num_steps = int(c.evaluate.num_steps) or c.sampler.num_steps
      self._samplers[key] = common.make_sampler(c, self.pipe, edit_fn=clamp.make_edit_fn(k, kept, dtype))
    return self._samplers[key]

  def attack(self, sampler) -> adversarial.PrefixAttack:
    if id(sampler) not in self._attacks:
      a = self.config.attack
      self._attacks[id(sampler)] = adversarial.PrefixAttack(
          sampler, a.prefix_tokens, a.learning_rate, a.weight_decay, a.timesteps_per_step, a.check_timesteps,
          a.remat)
    return self._attacks[id(sampler)]

  def spec(self, method: str, domain: str, name: str, setting: dict, sampler) -> clamp.ClampSpec:
    n_steps = len(sampler.timesteps)
    if method == "none":
      return clamp.empty_spec(n_steps, self.max_latents)
    sae = self.sae(method, domain)
    names = self.config.concepts.objects if domain == "object" else self.config.concepts.styles
    e = erase.concept_entry(method, sae["tables"], domain, concepts.lookup(name, names, domain), setting,
                            assignment=sae["assignment"])
    self.max_latents = max(self.max_latents, erase.spec_size([e], self.max_latents))
    return clamp.build_spec([e], sampler.timesteps, sae["tables"]["timesteps"], self.max_latents)

  def target_latents(self, prompt: str, seeds: list[int], domain: str) -> np.ndarray:
    """The base model's final latents of ``prompt`` at ``seeds`` (no erasure): the attack's targets."""
    sae = self.sae("none", domain)
    key = (prompt, tuple(seeds), sae["block"], sae["k"])
    if key not in self._targets:
      s = self.sampler(sae["k"], sae["block"], erasing=False)
      got = []
      sample_prompts(s, [prompt] * len(seeds), seeds, self.config.sampler.guidance_scale,
                     edit_params=(sae["params"], clamp.empty_spec(len(s.timesteps), self.max_latents)),
                     progress=False, on_batch=lambda i, out: got.append(np.asarray(out.latents)))
      self._targets[key] = np.concatenate(got)
    return self._targets[key]

  def judged(self, sampler, ids: np.ndarray, seeds: list[int], edit_params, domain: str):
    """Images of token ids ``ids`` at ``seeds`` (prompt-major) and the judge's ids of ``domain``."""
    noise = protocol.noise_seeds(self.config, len(ids), seeds)  # evaluate.noise
    rows = np.repeat(ids, len(seeds), axis=0)
    imgs = sample_token_ids(sampler, rows, noise, self.config.sampler.guidance_scale, edit_params=edit_params,
                            progress=False)
    pred_obj, pred_sty = self.judge.predict(protocol.judged_images(self.config, imgs))
    return imgs, np.asarray(pred_obj if domain == "object" else pred_sty)

  def run_unit(self, unit: dict) -> dict:
    t0 = time.perf_counter()
    a, pipe = self.config.attack, self.pipe
    m, d, n = unit["method"], unit["domain"], unit["concept"]
    sae = self.sae(m, d)
    block = self.domain_block[d]
    sampler = self.sampler(sae["k"], block, erasing=m != "none")
    spec = self.spec(m, d, n, unit["setting"], sampler)
    ep = (sae["params"], spec)
    names = self.config.concepts.objects if d == "object" else self.config.concepts.styles
    cid = concepts.lookup(n, names, d)
    base_ids = pipe.tokenize(unit["prompts"])
    attack = self.attack(sampler)
    allowed = np.flatnonzero(np.asarray(attack.allowed))
    adv_ids, texts, objectives = [], [], []
    for j, prompt in enumerate(unit["prompts"]):
      # The same start and noise for every method: the methods differ only by their clamp.
      seed = [int(a.seed), j, zlib.crc32(f"{d}/{n}".encode())]
      init = np.random.default_rng(seed).choice(allowed, int(a.prefix_tokens)).astype(np.int32)
      ids = adversarial.with_prefix(base_ids[j], init, pipe.tokenizer.pad_token_id)[None]
      x0 = self.target_latents(prompt, unit["target_seeds"], d)
      r = attack.run(pipe.params, ep, ids, x0, init, int(a.steps), jax.random.PRNGKey(np.uint32(zlib.crc32(
          str(seed).encode()))), int(a.check_every))
      adv_ids.append(adversarial.with_prefix(base_ids[j], r.tokens, pipe.tokenizer.pad_token_id))
      texts.append(f"{pipe.tokenizer.decode(r.tokens.tolist())} | {prompt}")
      objectives.append({"initial": r.initial_objective, "best": r.best_objective,
                         "checks": r.checks.tolist(), "tokens": r.tokens.tolist()})
    before_imgs, before = self.judged(sampler, base_ids, unit["seeds"], ep, d)
    after_imgs, after = self.judged(sampler, np.stack(adv_ids), unit["seeds"], ep, d)
    out = {"concept_id": cid, "pred_before": before.tolist(), "pred_after": after.tolist(),
           "adversarial": texts, "adversarial_ids": np.stack(adv_ids).tolist(), "objective": objectives,
           "wall_s": time.perf_counter() - t0}
    if a.grid:
      out[units_lib.ARRAYS] = {"before": img_utils.to_uint8(before_imgs), "after": img_utils.to_uint8(after_imgs)}
    return out


_CONTEXT: dict = {}  # the last run's loaded model and compiled attack, reused by a rerun in the same process


def _context(config, judge) -> Attack:
  """An ``Attack`` for ``config``: the last one when nothing it loaded or compiled differs (a rerun in
  one process, e.g. the pipeline's or a test's, then compiles nothing again)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for f in ("out_dir", "stop_after", "chosen_from", "grid", "objects", "styles", "methods"):
    c.attack[f] = None
  files = [p for m in METHODS[1:] for b in blocks.blocks(config)
           for p in (os.path.join(layout.method_sae(blocks.block_config(config, b), m), "sae.safetensors"),
                     os.path.join(layout.method_scores(blocks.block_config(config, b), m), "scores.npz"))]
  key = (c.to_json(sort_keys=True), id(judge), tuple((p, os.path.getmtime(p)) for p in files if os.path.isfile(p)))
  ctx = _CONTEXT.get(key)
  if ctx is None or set(ctx.saes) < {(m, d) for m in config.attack.methods for d, _ in targets(config)}:
    _CONTEXT.clear()
    ctx = _CONTEXT[key] = Attack(config, judge)
  ctx.config = config
  return ctx


def fingerprint(config, ctx: Attack, chosen_path: str) -> dict:
  inputs = {"weights": ctx.pipe.weights_hash(), "judge": getattr(ctx.judge, "identity", type(ctx.judge).__name__),
            "chosen": hash_files([chosen_path]) if os.path.isfile(chosen_path) else ""}
  for (m, d), sae in ctx.saes.items():
    if m != "none":
      inputs.update({f"{sae['block']}/{m}_{k}": v for k, v in sae["identity"].items()})
  sections = ("model", "block", "style_block", "sampler", "concepts", "evaluate", "attack")
  fp = runs.make(config, sections, NOT_RESULT + protocol.raw_fields(config, sections), inputs, stage="attack")
  fp["settings"].update(protocol.settings(config, sections))
  return fp


def summarise(config, results: units_lib.UnitResults, todo: list[dict], out_dir: str) -> dict:
  """Per concept and per method: UA before, ASR (= 1 - UA after) with 95% intervals; table.md, prompts.json."""
  rows, prompts, by_method, by_concept = [], {}, {}, {}
  for u in todo:
    r = results.read(u)
    hit_b = np.asarray(r["pred_before"]) == r["concept_id"]
    hit_a = np.asarray(r["pred_after"]) == r["concept_id"]
    asr, lo, hi = intervals.proportion_interval(hit_a)
    rows.append({"method": u["method"], "domain": u["domain"], "concept": u["concept"], "setting": u["setting"],
                 "UA_before": float(1 - hit_b.mean()), "UA_after": float(1 - asr), "ASR": asr, "ASR_ci": [lo, hi],
                 "n_images": int(hit_a.size), "objective": [[o["initial"], o["best"]] for o in r["objective"]]})
    prompts[f"{u['method']}/{u['domain']}/{u['concept']}"] = r["adversarial"]
    by_method.setdefault(u["method"], []).append((hit_b, hit_a))
    by_concept.setdefault((u["domain"], u["concept"]), {})[u["method"]] = hit_a
  methods = {}
  for m, pairs in by_method.items():
    asr, lo, hi = intervals.grouped_interval([h for _, h in pairs])
    ua_b, blo, bhi = intervals.grouped_interval([1 - h for h, _ in pairs])
    methods[m] = {"ASR": asr, "ASR_ci": [lo, hi], "UA_before": ua_b, "UA_before_ci": [blo, bhi],
                  "UA_after": 1 - asr, "concepts": len(pairs)}
  lines = ["| method | concepts | UA before attack | UA after attack | attack success rate |", "|---|---|---|---|---|"]
  lines += [f"| {m} | {r['concepts']} | {intervals.fmt(r['UA_before'], r['UA_before_ci'])} | "
            f"{intervals.fmt(r['UA_after'], [1 - r['ASR_ci'][1], 1 - r['ASR_ci'][0]])} | "
            f"{intervals.fmt(r['ASR'], r['ASR_ci'])} |" for m, r in methods.items()]
  # SAEmnesia - SAeUron on the same prompts and seeds of every concept both attacked.
  both = [v for v in by_concept.values() if "saemnesia" in v and "saeuron" in v]
  diff = None
  if both:
    d, lo, hi = intervals.paired_grouped_difference([v["saemnesia"] for v in both], [v["saeuron"] for v in both])
    diff = {"pair": ["saemnesia", "saeuron"], "ASR": d, "ASR_ci": [lo, hi], "concepts": len(both)}
    lines.append(f"| saemnesia - saeuron, paired | {len(both)} | | | {100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
  lines += ["", "| method | domain | concept | UA before | ASR [95%] | adversarial prompts |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['domain']} | {r['concept']} | {intervals.fmt(r['UA_before'])} | "
            f"{intervals.fmt(r['ASR'], r['ASR_ci'])} | "
            + "; ".join(f"`{t}`" for t in prompts[f"{r['method']}/{r['domain']}/{r['concept']}"]) + " |"
            for r in rows]
  atomic_write_bytes(os.path.join(out_dir, "table.md"), ("\n".join(lines) + "\n").encode())
  atomic_write_json(os.path.join(out_dir, "prompts.json"), prompts)
  a = config.attack
  summary = {"methods": methods, "difference": diff, "per_concept": rows, "budget": {
      "prefix_tokens": a.prefix_tokens, "steps": a.steps, "learning_rate": a.learning_rate,
      "timesteps_per_step": a.timesteps_per_step, "prompts": a.prompts, "target_seeds": list(a.target_seeds)},
      "wall_s": sum(results.read(u)["wall_s"] for u in todo)}
  atomic_write_json(os.path.join(out_dir, "summary.json"), summary, nonfinite_as_null=True)  # NaN / inf: null
  return summary


def attack_grid(config, results: units_lib.UnitResults, todo: list[dict], out_dir: str, cols: int = 4) -> str:
  """Per concept and method: a row of unattacked images, then the same prompts and seeds attacked."""
  rows, labels = [], []
  for u in todo:
    arr = results.read_arrays(u)
    if not arr:
      continue
    for part in ("before", "after"):
      imgs = arr[part][:cols]
      if len(imgs) < cols:
        imgs = np.concatenate([imgs, np.zeros((cols - len(imgs), *imgs.shape[1:]), imgs.dtype)])
      rows.append(imgs)
      labels.append(f"{u['concept']}: {u['method']} {'attacked' if part == 'after' else 'plain'}")
  if not rows:
    return ""
  imgs = np.concatenate(rows).astype(np.float32) / 255.0
  g = img_utils.grid(imgs, len(rows), cols, scale=img_utils.tile_scale(imgs.shape[1]), row_labels=labels,
                     col_labels=[f"image {i + 1}" for i in range(cols)],
                     label_width=max(150, 7 * max(len(x) for x in labels)))
  path = os.path.join(out_dir, "grid.png")
  img_utils.save_image(path, g)
  return path


def dry_run(config: ml_collections.ConfigDict, print_fn=print) -> dict:
  """Compiles the attack's step (loss, gradient through the text encoder, the UNet and the clamp, AdamW)
  from the model's config files alone, for one device of ``config.topology`` (or a local one), and
  prints its per-device memory, FLOPs and roofline as runtime/sizing.py does for the samplers."""
  from saemnesia_jax.runtime import sizing  # deferred: a dry run only
  pipe = common.load_model(config, abstract=True)
  c = copy.deepcopy(config)
  c.sampler.num_steps = int(c.evaluate.num_steps) or c.sampler.num_steps
  sampler = common.make_sampler(c, pipe, edit_fn=clamp.make_edit_fn(config.sae.k))
  a = config.attack
  atk = adversarial.PrefixAttack(sampler, a.prefix_tokens, a.learning_rate, a.weight_decay, a.timesteps_per_step,
                                 a.check_timesteps, a.remat)
  d_in = sampler.block_output_shape(config.block)[-1]
  L, m, n = objectives.n_latents(config, d_in), int(config.evaluate.max_latents), len(sampler.timesteps)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  sae = {"W_enc": f32(d_in, L), "b_enc": f32(L), "W_dec": f32(L, d_in), "b_dec": f32(d_in)}
  spec = clamp.ClampSpec(jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((n, m), bool), f32(n, m),
                         f32(n, m))
  e = f32(int(a.prefix_tokens), adversarial.token_table(pipe.params).shape[1])
  x0 = f32(len(a.target_seeds), *sampler.latent_shape)
  args = (e, jax.eval_shape(atk.opt.init, e), pipe.params, (sae, spec),
          jax.ShapeDtypeStruct((1, pipe.max_length), jnp.int32), x0, jax.ShapeDtypeStruct((2,), jnp.uint32),
          jax.ShapeDtypeStruct((), bool))
  weights = int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(pipe.params)))
  fix = ("attack.timesteps_per_step or the targets (attack.target_seeds), or keep attack.remat=True"
         + (", or use model.dtype=bfloat16" if config.model.dtype == "float32" else ""))
  info = {"targets": len(a.target_seeds), "timesteps_per_step": int(a.timesteps_per_step), "remat": bool(a.remat),
          "height": sampler.height, "dtype": config.model.dtype, "weights_bytes": weights, "steps": int(a.steps)}
  title = (f"attack step, {len(a.target_seeds)} target images of {sampler.height}x{sampler.width} px, "
           f"{a.timesteps_per_step} timestep(s) per step, remat {a.remat}, {config.model.dtype}, weights "
           f"{weights / 2**30:.2f} GiB")
  return sizing.one_device_dry_run(config, "attack", atk._step, args, 1.0, "steps", fix, info, title, print_fn)


def run(config: ml_collections.ConfigDict, judge: Any = None, progress: bool = True) -> dict | None:
  if config.get("dry_run"):
    return dry_run(config)
  units_lib.initialize_distributed()
  out_dir = layout.attack_dir(config)
  chosen = read_chosen(config) if any(m != "none" for m in config.attack.methods) else {}
  todo = units(config, chosen)
  ctx = _context(config, judge)
  runs.begin(out_dir, fingerprint(config, ctx, layout.attack_chosen(config)), overwrite=runs.overwrite(config),
             continuable=CONTINUABLE, fresh="--config.attack.out_dir=<new folder>",
             write=jax.process_index() == 0)
  units_lib.barrier("attack-fingerprint")
  root = os.path.join(out_dir, "units")
  results = units_lib.UnitResults(root)
  stop = int(config.attack.stop_after)
  if stop > 0:  # a partial run, as an interrupted one leaves it
    units_lib.run_units(root, results.pending(todo)[:stop], ctx.run_unit, progress=progress)
    print(f"attack: stopped after {stop} unit(s) (attack.stop_after); rerun without it to finish")
    return None
  units_lib.run_units(root, todo, ctx.run_unit, progress=progress)
  units_lib.gather(root, todo)
  if jax.process_index() != 0:
    return None
  summary = summarise(config, results, todo, out_dir)
  if config.attack.grid:
    summary["grid"] = attack_grid(config, results, todo, out_dir)
  print(open(os.path.join(out_dir, "table.md")).read())
  print(f"wrote {out_dir}")
  return summary


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call: whether this process wrote the summary."""
  return run(config, judge=judge, progress=progress) is not None
