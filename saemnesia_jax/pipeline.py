"""The whole method in one command: every stage in order, then the report.

  python -m saemnesia_jax.pipeline --config configs/canvas_mini.py                          # Table 1 as in the README
  python -m saemnesia_jax.pipeline --config configs/canvas_mini.py --config.pipeline.quick=True  # <= 20 min, 2 cores
  launch/local.sh 2 python -m saemnesia_jax.pipeline --config configs/canvas_mini.py

Stages (``pipeline.stages``): collect, probe, train (SAeUron's SAE), scores,
train_sup and scores_sup (SAEmnesia's supervised fine-tune,
``config_defaults.supervised_of``: the config's ``pipeline.sup_loss`` and
``pipeline.sup_train``), evaluate, report. Each runs through its own
``run(config)``, as ``python -m saemnesia_jax.<stage>`` would.

Skipping and resuming: when a stage returns, ``{workdir}/pipeline/<stage>.json``
records its fingerprint (a hash of the config sections it reads and of the
fingerprints of the stages it reads from). A rerun skips a stage whose record
has the same fingerprint, refuses one whose record differs (its outputs were
made with other settings: use another workdir, or delete them and the record),
and runs one with no record: an interrupted stage continues from what it
wrote (collect's units, the trainer's checkpoints, evaluate's units).

``pipeline.quick``: the same stages in ``{workdir}/quick``, reading the full
run's activation store, with a shorter SAE training and a smaller evaluation
(``pipeline.quick_*``: the first n objects and styles, a smaller gamma and
percentile grid, fewer seeds); the report says so.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("pipeline")

import hashlib
import importlib
import json
import os
import time
from typing import Any

import jax
import ml_collections

from saemnesia_jax import judges
from saemnesia_jax.evaluation import protocol
from saemnesia_jax.runtime import config_defaults, layout, pricing, registry, runs, units
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, atomic_write_json, read_json

STAGES = registry.PIPELINE_STEPS


class PipelineError(UserError):
  pass


quick_config = config_defaults.quick_of


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The config each step runs with (the supervised ones from ``supervised_of``)."""
  base = quick_config(config) if config.pipeline.quick else ml_collections.ConfigDict(config.to_dict())
  sup = config_defaults.supervised_of(base)
  return {step.name: sup if step.supervised else base for step in registry.PIPELINE}


def fingerprints(configs: dict[str, ml_collections.ConfigDict]) -> dict[str, str]:
  """A hash per step of the config sections it reads and of its upstream steps' hashes."""
  fps: dict[str, str] = {}
  for step in registry.PIPELINE:
    c = configs[step.name]
    sections = registry.STAGES[step.stage].fingerprint
    data = {k: c[k].to_dict() if isinstance(c[k], ml_collections.ConfigDict) else c[k] for k in sections}
    _protocol_as_resolved(c, sections, data)
    for field, default in runs.LATER_FIELDS.items():  # at their defaults, records made before them still match
      section, name = field.split(".", 1)
      if section in data and data[section].get(name, default) == default:
        data[section].pop(name, None)
    data["upstream"] = {u: fps[u] for u in step.upstream}
    fps[step.name] = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return fps


def _protocol_as_resolved(c: ml_collections.ConfigDict, sections, data: dict) -> None:
  """The protocol fields of ``data`` as resolved, and only where not the project's
  (evaluation/protocol.py): a config on ``project`` hashes as before the fields existed."""
  for f in protocol.raw_fields(c, sections):
    section, name = f.split(".", 1)
    data[section].pop(name, None)
  resolved = protocol.settings(c, sections)
  if resolved:
    data["protocol"] = resolved


def _run_step(step: registry.Step, c: ml_collections.ConfigDict, judge: Any, progress: bool) -> Any:
  """A step through its stage's ``pipeline_step``, the stage reached by name (runtime/registry.py)."""
  module = importlib.import_module(registry.STAGES[step.stage].module)
  return module.pipeline_step(c, judge=judge, progress=progress)


# ---------------------------------------------------------------- dry run

PRICED = ("collect", "train", "train_sup", "evaluate")  # the steps whose programs price the run


def _compiled(step: registry.Step, c: ml_collections.ConfigDict, key: str) -> dict:
  """A step's dry run (its stage's ``run`` with ``dry_run``), reused from
  ``{workdir}/dry_run/pipeline_<step>.json`` when made with the same settings
  (``key``): each SD program takes minutes to compile on a small host."""
  path = layout.dry_run_file(c.workdir, f"pipeline_{step.name}")
  if os.path.isfile(path) and read_json(path).get("key") == key:
    print(f"[pipeline] {step.name}: compiled with the same settings before ({path}), reused")
    return read_json(path)["dry_run"]
  print(f"[pipeline] {step.name}: compiling")
  out = importlib.import_module(registry.STAGES[step.stage].module).run(c)
  atomic_write_json(path, {"key": key, "dry_run": out})
  return out


def _evaluate_units(c: ml_collections.ConfigDict) -> dict[str, int]:
  """Units per phase of the evaluation (sweep, development, final, sequential) with
  each concept's first setting standing for the one a sweep would choose, and each
  method's first rule variant for the one the development seeds would."""
  from saemnesia_jax.evaluation import plan  # deferred: the evaluation's planning, not needed by a run
  chosen = {(v.label(m), d, n): plan.settings(c, m, v, d)[0] for m, v in plan.arms(c) for d, n in plan.targets(c)}
  rules = None
  if tuple(c.evaluate.get("rule_seeds", ())):
    papers = {m: v.label(m) for m, v in plan.arms(c) if not v.name}
    variant = {}
    for m, v in plan.arms(c):
      if v.name:
        variant.setdefault(m, v.label(m))
    rules = {"chosen": {**papers, **variant}}
  phases = {"sweep": plan.sweep_units(c), "development": plan.rule_units(c, chosen),
            "final": plan.final_units(c, plan.reported(c, chosen, rules)),
            "sequential": plan.sequential_units(c, chosen)}
  return {k: sum(len(u["seeds"]) for u in v) for k, v in phases.items()}


def price_lines(configs: dict, compiled: dict, sampling_chips: int) -> list[pricing.Line]:
  """The work of each priced step (counted from its config) at its compiled program's roofline rate."""
  from saemnesia_jax.diffusion import blocks  # deferred: only a dry run prices
  from saemnesia_jax.evaluation import concepts, protocol  # deferred: only a dry run prices
  from saemnesia_jax.runtime import sizing  # deferred: only a dry run prices
  lines = []
  base = configs["collect"]
  names = blocks.blocks(base)
  folder = base.collect.anchor_prompts_dir
  grid_len = (len(concepts.prompt_grid(base.concepts)) if not folder else None if not os.path.isdir(folder) else
              len(concepts.anchor_file_grid(base.concepts, folder, base.collect.prompts_per_object)))
  images, how = pricing.collect_images(base, grid_len)
  if "collect" in compiled:
    rate = compiled["collect"]["program"]["throughput"] * sampling_chips
    lines += [pricing.Line(f"collect {b}", "collect", images, "images", rate, sampling_chips, how) for b in names]
  tokens_per_map = sizing.shape_record(base).tokens_per_map
  maps = images * base.sampler.num_steps  # one map per stored step
  for step, label in (("train", "SAeUron SAE"), ("train_sup", "SAEmnesia fine-tune")):
    if step not in compiled:
      continue
    d = compiled[step]
    rate = d["program"]["throughput"]
    for b in names:
      t = blocks.block_config(configs[step], b).train
      tokens = (t.epochs * (1 - t.val_fraction) * maps * tokens_per_map if t.epochs
                else t.steps * d["tokens_per_step"])
      lines.append(pricing.Line(f"{step} {b}", step, tokens, "tokens", rate, d["devices"],
                                f"{label}, {t.epochs:g} epochs" if t.epochs else f"{label}, {t.steps} steps"))
      lines.append(pricing.Line(f"scores{'_sup' if step == 'train_sup' else ''} {b}", step, maps * tokens_per_map,
                                "tokens", rate, d["devices"], "one pass, priced at the train step's rate"))
  if "evaluate" in compiled:
    c = configs["evaluate"]
    per_seed = len(protocol.evaluation_grid(c))
    rate = compiled["evaluate"]["program"]["throughput"] * sampling_chips
    for phase, n in _evaluate_units(c).items():
      if n:
        lines.append(pricing.Line(f"evaluate: {phase}", "evaluate", n * per_seed, "images", rate, sampling_chips,
                                  f"{n} unit-seeds x {per_seed} prompts"))
  return lines


def dry_run(config: ml_collections.ConfigDict, print_fn=print) -> dict:
  """Compiles every priced step's programs for ``config.topology`` (or the local
  devices) and prices the whole run (``runtime/pricing.py``); writes
  ``{workdir}/dry_run/pipeline.json`` and ``pipeline.md``."""
  from saemnesia_jax.runtime import topology  # deferred: only a dry run names a slice
  configs = stage_configs(config)
  fps = fingerprints(configs)
  compiled = {}
  for step in registry.PIPELINE:
    if step.name in PRICED and step.name in config.pipeline.stages:
      c = ml_collections.ConfigDict(configs[step.name].to_dict())
      c.dry_run, c.topology = True, config.topology
      # A sampler runs on one chip: slices of one generation share its figures.
      on = topology.resolve(config.topology).chip.generation if config.topology and step.stage in (
          "collect", "evaluate") else config.topology
      compiled[step.name] = _compiled(step, c, f"{fps[step.name]}:{on}")
  if not all("throughput" in d["program"] for d in compiled.values()):
    print_fn(f"[pipeline] every step compiled ({', '.join(compiled)}); the whole run is priced only for a chip "
             "with known peak FLOPs and bandwidth: add --config.topology=<slice> (e.g. v5p-8)")
    return {"topology": config.topology, "compiled": list(compiled)}
  if config.topology:
    sl = topology.resolve(config.topology)
    chips, n_hosts, where = sl.chips, pricing.hosts(sl.chips, sl.chip.generation), f"TPU {config.topology}"
  else:
    chips, n_hosts, where = len(jax.devices()), jax.process_count(), f"{len(jax.devices())} local devices"
  out = {"topology": config.topology, "chips": chips, "hosts": n_hosts}
  text = []
  for key, label, sampling in (("one_per_host", "one process per host (the default launch)", n_hosts),
                               ("one_per_chip", "one process per chip", chips)):
    priced = out[key] = pricing.price(price_lines(configs, compiled, sampling), chips)
    text.append(pricing.table(priced, f"Whole run on {where} ({chips} chips, {n_hosts} host(s)); samplers on "
                                      f"{sampling} chip(s): {label}"))
    if n_hosts == chips:
      break
  workdir = configs["collect"].workdir
  md = "\n\n".join(text) + "\n"
  atomic_write_json(layout.dry_run_file(workdir, "pipeline"), out)
  atomic_write_bytes(os.path.join(layout.dry_run_dir(workdir), "pipeline.md"), md.encode())
  print_fn(md)
  print_fn(f"wrote {layout.dry_run_file(workdir, 'pipeline')} and pipeline.md")
  return out


def run(config: ml_collections.ConfigDict, judge: Any = None, progress: bool = True) -> dict:
  """Runs the stages of ``config.pipeline.stages``; returns {stage: 'ran' | 'skipped'}."""
  if config.get("dry_run"):
    return dry_run(config)
  units.initialize_distributed()
  unknown = set(config.pipeline.stages) - set(STAGES)
  if unknown:
    raise PipelineError(f"config.pipeline.stages has {sorted(unknown)}; known: {STAGES}")
  configs = stage_configs(config)
  fps = fingerprints(configs)
  judge = judge or judges.from_spec(config.pipeline.judge)
  workdir = configs["collect"].workdir
  done, t_all = {}, time.perf_counter()
  for step in registry.PIPELINE:
    stage = step.name
    if stage not in config.pipeline.stages:
      continue
    units.barrier(f"pipeline-{stage}")  # every process decides on the same records
    path = layout.pipeline_record(workdir, stage)
    if stage != "report" and os.path.isfile(path) and read_json(path).get("fingerprint") == fps[stage]:
      print(f"[pipeline] {stage}: done with the same settings ({path}), skipped")
      done[stage] = "skipped"
      continue
    # Otherwise the stage runs: its own run fingerprint (runtime/runs.py) continues an
    # interrupted run, or refuses other settings naming each differing field.
    print(f"[pipeline] {stage}: running")
    t0 = time.perf_counter()
    result = _run_step(step, configs[stage], judge, progress)
    wall = time.perf_counter() - t0
    units.barrier(f"pipeline-{stage}-done")
    if jax.process_index() == 0:
      atomic_write_json(path, {"stage": stage, "fingerprint": fps[stage], "wall_s": wall,
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "result": result if isinstance(result, (int, str, bool)) else None})
    print(f"[pipeline] {stage}: done in {wall:.1f} s")
    done[stage] = "ran"
  print(f"[pipeline] all stages done in {time.perf_counter() - t_all:.1f} s: {done}; workdir {workdir}")
  return done

