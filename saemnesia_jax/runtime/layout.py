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
  {workdir}/dry_run/<program>.json  a dry run's figures per compiled program (--config.dry_run=True)
  {workdir}/dry_run/tiny_configs/   the tiny pipeline's config files, for a dry run before it is written
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

from saemnesia_jax.canvas_mini import ASSET_DIR as CANVAS_MINI_ASSETS
from saemnesia_jax.canvas_mini import PIPELINE_DIR as CANVAS_MINI_PIPELINE
from saemnesia_jax.runtime.errors import ConfigError

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


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def is_plain_name(name: Any) -> bool:
  """Whether ``name`` is one plain path component: letters, digits, . _ -,
  not starting with '.' or '-' (so never '.', '..', a hidden name or a path)."""
  return isinstance(name, str) and len(name) <= 128 and _PLAIN_NAME.fullmatch(name) is not None


def check_name(field: str, name: Any) -> str:
  """``name`` if it is a plain folder name (``is_plain_name``), else ConfigError naming ``field``."""
  if not is_plain_name(name):
    raise ConfigError(f"config.{field}={name!r}: must be a plain folder name (letters, digits, . _ -; not "
                      "'.', '..', a path or starting with '.' or '-'), e.g. sae_unsup")
  return name


# SD v1.5's config.json files (unet, text_encoder, vae, scheduler; no weights,
# no tokenizer): what a dry run sizes when model.path holds no config.json.
SD15_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "sd15_configs")


def model_config_dir(config: Any) -> str:
  """Where a dry run reads the model's config files: ``model_dir`` when it has
  unet/config.json; else, for model.path='', the tiny pipeline's configs
  under ``{workdir}/dry_run`` (written by the dry run), for any other path
  SD v1.5's shipped configs (``SD15_CONFIGS``)."""
  path = model_dir(config)
  if os.path.isfile(os.path.join(path, "unet", "config.json")):
    return path
  if not config.model.path:
    return os.path.join(dry_run_dir(config.workdir), "tiny_configs")
  return SD15_CONFIGS


def dry_run_dir(workdir: str) -> str:
  return os.path.join(workdir, "dry_run")


def dry_run_file(workdir: str, program: str) -> str:
  """A dry run's figures of one compiled program (e.g. train_sae_unsup, collect)."""
  return os.path.join(dry_run_dir(workdir), f"{program}.json")


def sae_run(workdir: str, run: str) -> str:
  """A training run's folder, e.g. ``{workdir}/sae_unsup``."""
  return os.path.join(workdir, check_name("train.name", run))


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


def unlearn_sae_root(config: Any) -> str:
  """Where ``unlearn`` finds sae_unsup/ and sae_sup/: ``unlearn.sae_root``, the
  shipped SAEs for model.path 'canvas_mini', else the workdir."""
  u = config.unlearn
  if u.sae_root:
    return u.sae_root
  return CANVAS_MINI_ASSETS if config.model.path == "canvas_mini" else config.workdir


def unlearn_sources(config: Any) -> dict[str, tuple[str, str]]:
  """Per method of ``unlearn.methods``: (SAE folder, scores folder)."""
  u, root = config.unlearn, unlearn_sae_root(config)
  if (u.sae_dir or u.scores_dir) and len(u.methods) != 1:
    field = "sae_dir" if u.sae_dir else "scores_dir"
    raise ConfigError(f"config.unlearn.{field}={u[field]!r}: names one SAE, but unlearn.methods="
                      f"{tuple(u.methods)}; give one method, e.g. --config.unlearn.methods=\"('saeuron',)\", or "
                      "leave it '' and set --config.unlearn.sae_root")
  out = {}
  for m in u.methods:
    if m not in RUN_OF_METHOD:
      raise ConfigError(f"config.unlearn.methods={tuple(u.methods)}: unknown method {m!r}; known: "
                        f"{', '.join(RUN_OF_METHOD)}")
    out[m] = (u.sae_dir or sae_export(root, RUN_OF_METHOD[m]), u.scores_dir or sae_scores(root, RUN_OF_METHOD[m]))
  return out


def unlearn_chosen(config: Any) -> str | None:
  """The chosen settings ``unlearn`` reads: ``unlearn.chosen``, else chosen.json or
  eval/summary.json under the SAE root, else None."""
  u, root = config.unlearn, unlearn_sae_root(config)
  if u.chosen:
    return u.chosen
  for p in (os.path.join(root, "chosen.json"), eval_summary_in(root)):
    if os.path.isfile(p):
      return p
  return None


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


OUTPUTS: dict[str, Callable[[Any], tuple[str, str]]] = {  # (the field that sets it, the folder) a stage writes
    "sample": lambda c: ("workdir", samples_dir(c.workdir)),
    "collect": lambda c: ("collect.store_path" if c.collect.store_path else "workdir", store_path(c)),
    "probe": lambda c: ("probe.out_dir" if c.probe.out_dir else "workdir", probe_dir(c)),
    "train": lambda c: ("workdir", run_dir(c)),
    "scores": lambda c: ("scores.out_dir", c.scores.out_dir) if c.scores.out_dir else
    ("scores.sae_dir" if c.scores.sae_dir else "workdir", os.path.join(os.path.dirname(scores_sae_dir(c)),
                                                                        SCORES)),
    "evaluate": lambda c: ("evaluate.out_dir" if c.evaluate.out_dir else "workdir", eval_dir(c)),
    "unlearn": lambda c: ("unlearn.out_dir" if c.unlearn.out_dir else "workdir", unlearn_dir(c)),
    "report": lambda c: ("workdir", report_dir(c.workdir)),
    "attack": lambda c: ("attack.out_dir" if c.attack.out_dir else "workdir", attack_dir(c)),
    "pipeline": lambda c: ("workdir", c.workdir),
}
