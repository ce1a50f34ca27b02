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

import ml_collections

from saemnesia_jax.runtime import config_defaults
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_json, read_json

STAGES = ("collect", "probe", "train", "scores", "train_sup", "scores_sup", "evaluate", "report")
_STORE = ("model", "block", "sampler", "concepts", "collect")
# The config sections each stage reads, and the stages whose outputs it reads.
READS = {"collect": (_STORE, ()), "probe": (_STORE + ("probe",), ("collect",)),
         "train": (_STORE + ("sae", "train"), ("collect",)),
         "scores": (_STORE + ("sae", "train", "scores"), ("train",)),
         "train_sup": (_STORE + ("sae", "train"), ("collect", "scores")),
         "scores_sup": (_STORE + ("sae", "train", "scores"), ("train_sup",)),
         "evaluate": (_STORE + ("evaluate",), ("scores", "scores_sup")),
         "report": ((), ())}


class PipelineError(UserError):
  pass


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The quick variant: {workdir}/quick, the full run's store, the pipeline.quick_* settings."""
  from saemnesia_jax import collect
  p = config.pipeline
  q = ml_collections.ConfigDict(config.to_dict())
  q.collect.store_path = collect.store_path(config)
  q.workdir = os.path.join(config.workdir, "quick")
  q.train.steps = int(p.quick_train_steps)
  n = int(p.quick_concepts)
  ev = q.evaluate
  ev.objects = tuple(ev.objects or config.concepts.objects)[:n]
  ev.styles = tuple(ev.styles or config.concepts.styles)[:n]
  ev.sequential_objects = tuple(ev.sequential_objects or config.concepts.objects)[:n]
  ev.gammas, ev.percentiles = tuple(p.quick_gammas), tuple(p.quick_percentiles)
  ev.eval_seeds = tuple(p.quick_eval_seeds)
  return q


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The config each stage runs with (the supervised ones from ``supervised_of``)."""
  base = quick_config(config) if config.pipeline.quick else ml_collections.ConfigDict(config.to_dict())
  sup = config_defaults.supervised_of(base)
  return {s: sup if s.endswith("_sup") else base for s in STAGES}


def fingerprints(configs: dict[str, ml_collections.ConfigDict]) -> dict[str, str]:
  fps: dict[str, str] = {}
  for stage in STAGES:
    sections, upstream = READS[stage]
    c = configs[stage]
    data = {k: c[k].to_dict() if isinstance(c[k], ml_collections.ConfigDict) else c[k] for k in sections}
    _protocol_as_resolved(c, sections, data)
    data["upstream"] = {u: fps[u] for u in upstream}
    fps[stage] = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return fps


def _protocol_as_resolved(c: ml_collections.ConfigDict, sections, data: dict) -> None:
  """The protocol fields of ``data`` as resolved, and only where not the project's
  (evaluation/protocol.py): a config on ``project`` hashes as before the fields existed."""
  from saemnesia_jax.evaluation import protocol
  for f in protocol.raw_fields(c, sections):
    section, name = f.split(".", 1)
    data[section].pop(name, None)
  resolved = protocol.settings(c, sections)
  if resolved:
    data["protocol"] = resolved


def make_judge(spec: str) -> Any:
  """'module:factory' -> factory(): the evaluation's classifiers (see evaluate.make_judge)."""
  if not spec:
    return None
  if ":" not in spec:
    raise PipelineError(f"config.pipeline.judge={spec!r} must be 'module:factory', e.g. 'my_judges:make'")
  mod, attr = spec.split(":", 1)
  return getattr(importlib.import_module(mod), attr)()


def _run_stage(stage: str, c: ml_collections.ConfigDict, judge: Any, progress: bool) -> Any:
  from saemnesia_jax import collect, evaluate, probe, report, scores, train
  if stage == "collect":
    return collect.run(c)
  if stage == "probe":
    return probe.run(c)
  if stage in ("train", "train_sup"):
    from saemnesia_jax.diffusion import blocks
    if blocks.per_block(c):  # config.style_block: an SAE per block, as the train CLI runs them
      return {b: train.train(blocks.block_config(c, b), progress=progress)["step"] for b in blocks.blocks(c)}
    return train.train(c, progress=progress)["step"]
  if stage in ("scores", "scores_sup"):
    out = scores.run(c, progress=progress)  # with config.style_block: {block: result}
    return out["out_dir"] if "out_dir" in out else {b: r["out_dir"] for b, r in out.items()}
  if stage == "evaluate":
    return evaluate.run(c, judge=judge, progress=progress) is not None
  return report.build(c, c.workdir)


def run(config: ml_collections.ConfigDict, judge: Any = None, progress: bool = True) -> dict:
  """Runs the stages of ``config.pipeline.stages``; returns {stage: 'ran' | 'skipped'}."""
  import jax
  from saemnesia_jax.runtime import units
  units.initialize_distributed()
  unknown = set(config.pipeline.stages) - set(STAGES)
  if unknown:
    raise PipelineError(f"config.pipeline.stages has {sorted(unknown)}; known: {STAGES}")
  configs = stage_configs(config)
  fps = fingerprints(configs)
  judge = judge or make_judge(config.pipeline.judge)
  workdir = configs["collect"].workdir
  record_dir = os.path.join(workdir, "pipeline")
  done, t_all = {}, time.perf_counter()
  for stage in STAGES:
    if stage not in config.pipeline.stages:
      continue
    units.barrier(f"pipeline-{stage}")  # every process decides on the same records
    path = os.path.join(record_dir, f"{stage}.json")
    if stage != "report" and os.path.isfile(path) and read_json(path).get("fingerprint") == fps[stage]:
      print(f"[pipeline] {stage}: done with the same settings ({path}), skipped")
      done[stage] = "skipped"
      continue
    # Otherwise the stage runs: its own run fingerprint (runtime/runs.py) continues an
    # interrupted run, or refuses other settings naming each differing field.
    print(f"[pipeline] {stage}: running")
    t0 = time.perf_counter()
    result = _run_stage(stage, configs[stage], judge, progress)
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

