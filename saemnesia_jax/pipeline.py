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
from saemnesia_jax.runtime import config_defaults, layout, registry, units
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_json, read_json

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


def run(config: ml_collections.ConfigDict, judge: Any = None, progress: bool = True) -> dict:
  """Runs the stages of ``config.pipeline.stages``; returns {stage: 'ran' | 'skipped'}."""
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

