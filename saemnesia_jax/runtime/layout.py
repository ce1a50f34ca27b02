"""Every path in a workdir, computed in one place (JAX-free: the checks use it
before anything heavy is imported).

A workdir holds one run of the method::

  {workdir}/activations/          the activation store (collect; collect.store_path overrides)
  {workdir}/tiny_pipeline/        the random SD-like pipeline of model.path=''
  {workdir}/sae_unsup/            SAeUron's SAE (train.name): checkpoints/, export/, scores/, metrics.jsonl
  {workdir}/sae_sup/              SAEmnesia's supervised fine-tune, the same layout
  {workdir}/probe/                probe.json (probe.out_dir overrides)
  {workdir}/eval/                 units/, summary.json, tables and grids (evaluate.out_dir overrides)
  {workdir}/unlearn/              the main job's images (unlearn.out_dir overrides)
  {workdir}/attack/               units/, summary.json, table.md, prompts.json, grid.png (attack.out_dir overrides)
  {workdir}/samples/              the sample stage's images
  {workdir}/report/               report.md and its figures
  {workdir}/pipeline/<step>.json  the pipeline's record of each finished step
  {workdir}/quick/                the quick pipeline's own workdir (same layout, the full run's store)
"""
from __future__ import annotations

import os
from typing import Any

from saemnesia_jax.canvas_mini import PIPELINE_DIR as CANVAS_MINI_PIPELINE

UNSUP_RUN = "sae_unsup"  # SAeUron's SAE
SUP_RUN = "sae_sup"  # SAEmnesia's supervised fine-tune
RUN_OF_METHOD = {"saeuron": UNSUP_RUN, "saemnesia": SUP_RUN}
EXPORT = "export"  # the trained SAE in sparsify's layout + saemnesia.json
SCORES = "scores"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
FINGERPRINT = "fingerprint.json"


def store_path(config: Any) -> str:
  """The activation store: ``collect.store_path`` or ``{workdir}/activations``."""
  return config.collect.store_path or default_store(config.workdir)


def default_store(workdir: str) -> str:
  return os.path.join(workdir, "activations")


def model_dir(config: Any) -> str:
  """The pipeline folder of ``model.path``: 'canvas_mini' the shipped model,
  '' the tiny random pipeline in the workdir, else the path itself."""
  path = config.model.path
  if path == "canvas_mini":
    return CANVAS_MINI_PIPELINE
  if not path:
    return tiny_pipeline(config.workdir)
  return path


def tiny_pipeline(workdir: str) -> str:
  return os.path.join(workdir, "tiny_pipeline")


def sae_run(workdir: str, run: str) -> str:
  """A training run's folder, e.g. ``{workdir}/sae_unsup``."""
  return os.path.join(workdir, run)


def run_dir(config: Any) -> str:
  """The folder of the run that ``train`` writes (``train.name``), absolute."""
  return os.path.abspath(sae_run(config.workdir, config.train.name))


def sae_export(workdir: str, run: str = UNSUP_RUN) -> str:
  return os.path.join(workdir, run, EXPORT)


def sae_scores(workdir: str, run: str = UNSUP_RUN) -> str:
  return os.path.join(workdir, run, SCORES)


def metrics_file(workdir: str, run: str) -> str:
  return os.path.join(workdir, run, METRICS)


def scores_dir_for_assignment(config: Any) -> str:
  """Where the supervised trainer reads a greedy assignment: ``sae.scores_dir``
  or the unsupervised run's scores."""
  return config.sae.scores_dir or sae_scores(config.workdir, UNSUP_RUN)


def scores_sae_dir(config: Any) -> str:
  """The SAE the scores stage reads: ``scores.sae_dir`` or the unsupervised export."""
  return config.scores.sae_dir or sae_export(config.workdir, UNSUP_RUN)


def method_sae(config: Any, method: str) -> str:
  """A method's SAE for evaluation: ``evaluate.<method>_sae`` or its run's export."""
  return config.evaluate[f"{method}_sae"] or sae_export(config.workdir, RUN_OF_METHOD[method])


def method_scores(config: Any, method: str) -> str:
  return config.evaluate[f"{method}_scores"] or sae_scores(config.workdir, RUN_OF_METHOD[method])


def eval_dir(config: Any, workdir: str | None = None) -> str:
  return config.evaluate.out_dir or os.path.join(workdir or config.workdir, "eval")


def eval_summary(config: Any) -> str:
  return os.path.join(eval_dir(config), "summary.json")


def eval_summary_in(workdir: str) -> str:
  """The default evaluation's summary under ``workdir`` (what ``unlearn`` reads for chosen settings)."""
  return os.path.join(workdir, "eval", "summary.json")


def probe_dir(config: Any, workdir: str | None = None) -> str:
  return config.probe.out_dir or os.path.join(workdir or config.workdir, "probe")


def unlearn_dir(config: Any, workdir: str | None = None) -> str:
  return config.unlearn.out_dir or os.path.join(workdir or config.workdir, "unlearn")


def attack_dir(config: Any, workdir: str | None = None) -> str:
  return config.attack.out_dir or os.path.join(workdir or config.workdir, "attack")


def attack_chosen(config: Any) -> str:
  """The chosen settings the attack erases with: ``attack.chosen_from`` or the evaluation's summary."""
  return config.attack.chosen_from or eval_summary(config)


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, "samples")


def report_dir(workdir: str) -> str:
  return os.path.join(workdir, "report")


def pipeline_record(workdir: str, step: str) -> str:
  """The pipeline's record of a finished step (its fingerprint and wall time)."""
  return os.path.join(workdir, "pipeline", f"{step}.json")


def quick_workdir(workdir: str) -> str:
  return os.path.join(workdir, "quick")
