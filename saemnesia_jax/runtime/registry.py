"""The stages, in one table (JAX-free): module, the config sections each
reads, the stages whose outputs it reads, and what it writes (paths as
``runtime/layout.py`` computes them).

The command line (``runtime/cli.py``: help, which fields a stage reads), the
checks, the pipeline (order, fingerprints, skipping) and the report all read
this table. Stages are reached only by their module name from here, so no
library imports a stage and no stage imports another.
"""
from __future__ import annotations

import dataclasses

_COMMON = ("workdir", "overwrite", "protocol")
_BLOCKS = _COMMON + ("block", "style_block")
# What the activation store depends on: every stage downstream of collect hashes it.
STORE_SECTIONS = ("model", "block", "sampler", "concepts", "collect")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  module: str  # importable module with run(config)
  reads: tuple[str, ...]  # config sections / fields it uses (help, fingerprints)
  upstream: tuple[str, ...] = ()  # pipeline steps whose outputs it reads
  outputs: tuple[str, ...] = ()  # what it writes (layout.py)
  fingerprint: tuple[str, ...] = ()  # the sections the pipeline hashes to decide a skip


def _stage(name, reads, upstream=(), outputs=(), fingerprint=(), module=""):
  return Stage(name, module or f"saemnesia_jax.{name}", tuple(reads), tuple(upstream), tuple(outputs),
               tuple(fingerprint))


STAGES: dict[str, Stage] = {s.name: s for s in (
    _stage("sample", _COMMON + ("dry_run", "topology", "model", "sampler", "prompts", "seeds"),
           outputs=("{workdir}/samples",)),
    _stage("collect", _BLOCKS + ("dry_run", "topology", "model", "sampler", "concepts", "collect"),
           outputs=("{workdir}/activations",), fingerprint=STORE_SECTIONS),
    _stage("probe", _BLOCKS + ("collect.store_path", "probe"), upstream=("collect",),
           outputs=("{workdir}/probe",), fingerprint=STORE_SECTIONS + ("probe",)),
    _stage("train", _BLOCKS + ("dry_run", "topology", "model", "collect.store_path", "sae", "train"), upstream=("collect",),
           outputs=("{workdir}/{train.name}/checkpoints", "{workdir}/{train.name}/export",
                    "{workdir}/{train.name}/metrics.jsonl"), fingerprint=STORE_SECTIONS + ("sae", "train")),
    _stage("scores", _BLOCKS + ("collect.store_path", "sae.scores_dir", "scores"), upstream=("train",),
           outputs=("{scores.sae_dir}/../scores",), fingerprint=STORE_SECTIONS + ("sae", "train", "scores")),
    _stage("evaluate", _BLOCKS + ("dry_run", "topology", "model", "sampler", "concepts", "evaluate"),
           upstream=("scores", "scores_sup"), outputs=("{workdir}/eval",),
           fingerprint=STORE_SECTIONS + ("evaluate",)),
    _stage("attack", _BLOCKS + ("dry_run", "topology", "model", "sampler", "concepts", "evaluate", "attack"),
           upstream=("evaluate",), outputs=("{workdir}/attack",),
           fingerprint=STORE_SECTIONS + ("evaluate", "attack")),
    _stage("unlearn", _BLOCKS + ("model", "sampler", "concepts", "unlearn"), outputs=("{workdir}/unlearn",)),
    _stage("report", _COMMON + ("probe.out_dir", "evaluate.out_dir", "pipeline"), outputs=("{workdir}/report",)),
    _stage("pipeline", _BLOCKS + ("dry_run", "topology", "model", "sampler", "concepts", "collect", "probe", "sae", "train", "scores",
                                  "evaluate", "pipeline"), outputs=("{workdir}/pipeline",)),
    _stage("canvas_mini.ship_saes", _COMMON + ("unlearn.sae_root",), outputs=("saemnesia_jax/assets/canvas_mini",)),
    _stage("canvas_mini.build", _COMMON + ("data", "classifier", "model", "base_train", "base_eval", "build"),
           outputs=("saemnesia_jax/assets/canvas_mini",)),
)}


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of the pipeline: a stage run with the base or the supervised config."""
  name: str
  stage: str
  supervised: bool = False
  upstream: tuple[str, ...] = ()


def _step(name, stage, supervised=False, upstream=None):
  return Step(name, stage, supervised, tuple(STAGES[stage].upstream if upstream is None else upstream))


PIPELINE: tuple[Step, ...] = (
    _step("collect", "collect"),
    _step("probe", "probe"),
    _step("train", "train"),
    _step("scores", "scores"),
    _step("train_sup", "train", supervised=True, upstream=("collect", "scores")),
    _step("scores_sup", "scores", supervised=True, upstream=("train_sup",)),
    _step("evaluate", "evaluate"),
    _step("attack", "attack"),
    _step("report", "report"),
)
PIPELINE_STEPS = tuple(s.name for s in PIPELINE)
# The steps of pipeline.stages' default: the attack is off unless named (it is the
# costliest step, and the shipped pipeline is the same with it as without).
DEFAULT_STEPS = tuple(s for s in PIPELINE_STEPS if s != "attack")
