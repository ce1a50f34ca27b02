"""Stage `report`: report.md and its figures, built only from what the stages wrote.

  python -m saemnesia_jax.report --config configs/canvas_mini.py
  python -m saemnesia_jax.report --config configs/canvas_mini.py --config.pipeline.quick=True  # the quick run's

Reads ``{workdir}`` (the quick run's ``{workdir}/quick`` with
``pipeline.quick``): the SAE runs' ``metrics.jsonl``, the scores stages'
association reports, the probe, ``eval/`` (summary.json, cost, sequential,
erasure grid), ``unlearn/grid.png`` if the unlearn stage ran, and the
pipeline's stage records (wall times). Writes ``{workdir}/report/``:
``report.md``, ``training.png`` and copies of the other figures, so the
folder stands alone. Missing inputs are named in the report, not invented.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("report")

import json
import math
import os
import subprocess
import time
from typing import Any

import jax
import ml_collections
from matplotlib.figure import Figure

from saemnesia_jax.evaluation import association, intervals, metrics, quality
from saemnesia_jax.runtime import config_defaults, layout, registry
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, read_json
from saemnesia_jax.sae import artifacts

# Table 1 of the SAEmnesia paper (arXiv 2509.21379): Stable Diffusion v1.5 on UnlearnCanvas, in %.
PUBLISHED = {
    "published SD v1.5: SAeUron": dict(style_UA=95.80, style_IRA=99.10, style_CRA=99.40, object_UA=87.16,
                                       object_IRA=85.57, object_CRA=74.14, avg=90.10),
    "published SD v1.5: SAEmnesia": dict(style_UA=96.60, style_IRA=98.67, style_CRA=99.30, object_UA=94.65,
                                         object_IRA=91.39, object_CRA=88.48, avg=94.85),
}
_KEYS = ("style_UA", "style_IRA", "style_CRA", "object_UA", "object_IRA", "object_CRA", "avg")


def _read(path):
  return read_json(path) if os.path.isfile(path) else None


def _jsonl(path):
  if not os.path.isfile(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:  # a line torn by a killed trainer (its rerun drops it)
        continue
  return out


def _pct(v):
  return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def table1(summary: dict) -> str:
  """Table 1: the measured rows, each number with its 95% bootstrap interval
  over images where the summary holds one (a method's row chosen on the
  development seeds in bold), then, in a table of their own, the published
  ones: another model, judge and rule, so never a row of the measured table."""
  lines = ["| method | style UA | IRA | CRA | object UA | IRA | CRA | avg |", "|---|---|---|---|---|---|---|---|"]
  ivs = summary.get("intervals") or {}
  headline = set((summary.get("headline") or {}).values())
  for m, row in summary["table"].items():
    label = f"**{m}** (rule chosen on the development seeds)" if m in headline else m
    lines.append(f"| {label} | " + " | ".join(_with_interval(row.get(k), ivs.get(m, {}).get(k)) for k in _KEYS) + " |")
  lines += ["", "Published (SAEmnesia's Table 1: Stable Diffusion v1.5, UnlearnCanvas' judges, the papers' "
            "rule): another measurement, not comparable with the rows above.", "", lines[0], lines[1]]
  for m, row in PUBLISHED.items():
    lines.append(f"| *{m} (published, not measured here)* | " + " | ".join(f"*{row[k]:.2f}*" for k in _KEYS) + " |")
  return "\n".join(lines)


def _with_interval(v, iv) -> str:
  if not iv or _pct(v) == "" or any(x is None or math.isnan(x) for x in iv):
    return _pct(v)
  return f"{_pct(v)} [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def difference_section(summary: dict) -> list[str]:
  """The paired difference SAEmnesia - SAeUron with its interval and the seeds needed."""
  diff = summary.get("difference")
  if not diff:
    return []
  b = summary.get("bootstrap", {})
  return [f"95% intervals: percentile bootstrap over the images ({b.get('n_boot', '?')} replicates, resampling "
          "(prompt x seed) images within each concept; evaluation/intervals.py). The paired difference "
          f"SAEmnesia - SAeUron resamples the same images for both; seeds needed: "
          f"n = {b.get('eval_seeds', '?')} x (1.96 SE / |difference|)^2, the held-out seeds at which the "
          "interval would exclude 0 (normal approximation).", "",
          intervals.format_difference(diff, *b.get("pair", ("saemnesia", "saeuron")))]


def cost_table(summary: dict) -> str:
  lines = ["| method | sweep trials per concept | trials in all | wall (sweep + final, min) |", "|---|---|---|---|"]
  for m in summary["table"]:
    lines.append(f"| {m} | {summary['trials_per_concept'].get(m, 0)} | {summary['trials_total'].get(m, 0)} | "
                 f"{summary['wall_s'].get(m, 0.0) / 60:.1f} |")
  return "\n".join(lines)


def per_concept_table(summary: dict) -> str:
  lines = ["| method | domain | concept | UA | IRA | CRA | setting |", "|---|---|---|---|---|---|---|"]
  for r in summary["per_concept"]:
    setting = ", ".join(f"{k} {v}" for k, v in r.get("setting", {}).items())
    lines.append(f"| {r['method']} | {r['domain']} | {r['concept']} | {_pct(r['UA'])} | {_pct(r['IRA'])} | "
                 f"{_pct(r['CRA'])} | {setting} |")
  return "\n".join(lines)


def sequential_table(summary: dict) -> str:
  seq = summary.get("sequential") or {}
  if not seq:
    return ""
  methods = list(seq)
  lines = ["| n | " + " | ".join(f"{m} UA / IRA / CRA" for m in methods) + " |", "|---|" + "---|" * len(methods)]
  for i, r in enumerate(seq[methods[0]]):
    cells = [" / ".join(f"{100 * seq[m][i][k]:.1f}" for k in ("UA", "IRA", "CRA")) for m in methods]
    lines.append(f"| {r['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_training(runs: dict[str, list[dict]], path: str) -> bool:
  """FVU, dead latents and (supervised) concept accuracy against the step, per SAE run."""
  if not any(runs.values()):
    return False
  fig = Figure(figsize=(12, 3.2))
  panels = (("fvu", "FVU (solid: train, dashed: validation)", "val_fvu"), ("dead_fraction", "dead latents (fraction)", None),
            ("object_acc", "supervised accuracy", "style_acc"))
  for i, (key, title, extra) in enumerate(panels):
    ax = fig.add_subplot(1, 3, i + 1)
    for name, rows in runs.items():
      pts = [(r["step"], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), label=f"{name} {key}")
      if extra:
        pts = [(r["step"], r[extra]) for r in rows if extra in r]
        if pts:
          ax.plot(*zip(*pts), linestyle="--", label=f"{name} {extra}")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  atomic_write_bytes(path, metrics._png(fig))
  return True


def _commit() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown (no git)"
  return (head or "unknown (not a git checkout)") + (" with uncommitted changes" if dirty else "")


def _figure(src: str, out_dir: str, name: str, missing: list[str]) -> str | None:
  if not os.path.isfile(src):
    missing.append(src)
    return None
  with open(src, "rb") as f:  # a copy a kill cannot leave half-written
    atomic_write_bytes(os.path.join(out_dir, name), f.read())
  return name


def attack_section(config, workdir: str, out_dir: str, missing: list[str]) -> list[str]:
  """The attack stage's table and grid, where it ran ([] otherwise: it is off by default)."""
  adir = layout.attack_dir(config, workdir)
  summary = _read(os.path.join(adir, "summary.json"))
  if not summary or not os.path.isfile(os.path.join(adir, "table.md")):
    return []
  b = summary.get("budget", {})
  md = ["## Does the erasure hold? An adversarial prompt attack", "",
        f"UnlearnDiffAtk-style (docs/method.md): {b.get('prefix_tokens')} prefix tokens optimised for "
        f"{b.get('steps')} steps per prompt ({b.get('prompts')} prompts per concept) on the erased model's own "
        "diffusion loss, then sampled with the same erasure and judged. ASR: the share of attacked images in which "
        "the judge recognises the erased concept (UA after = 1 - ASR); 95% bootstrap intervals over the images.", "",
        open(os.path.join(adir, "table.md")).read()]
  name = _figure(os.path.join(adir, "grid.png"), out_dir, "attack_grid.png", missing)
  if name:
    md += [f"![attack grid]({name})", ""]
  return md


def build(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes {workdir}/report/report.md (and figures); returns its path."""
  out_dir = layout.report_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  eval_dir = layout.eval_dir(config, workdir)
  missing: list[str] = []
  md = [f"# SAEmnesia vs SAeUron: report of {workdir}", "",
        "Built by `python -m saemnesia_jax.report` from the files the stages wrote; nothing here is typed in "
        "by hand except the published rows, marked as such.", ""]
  if config.pipeline.quick:
    p = config.pipeline
    md += [f"**Quick run** (`pipeline.quick`): SAE trained {p.quick_train_steps} steps; erasing the first "
           f"{p.quick_concepts} objects and styles only; gamma grid {tuple(p.quick_gammas)}, SAeUron percentiles "
           f"{tuple(p.quick_percentiles)}, held-out seeds {tuple(p.quick_eval_seeds)}. Not comparable to the "
           "full table.", ""]
  summary = _read(os.path.join(eval_dir, "summary.json"))
  md += ["## Table 1: unlearning (UA / IRA / CRA, %)", ""]
  if summary:
    md += [table1(summary), ""] + difference_section(summary)
    md += ["Sweep trials and the time of sampling and judging per method:", "",
           cost_table(summary), ""]
  else:
    missing.append(os.path.join(eval_dir, "summary.json"))
    md += ["(no evaluation yet)", ""]
  if summary and summary.get("quality"):
    md += ["## Image quality under erasure", "",
           "FD: Frechet distance between the judge's penultimate features of the images sampled with the erasure "
           "and of the same prompts and seeds without it (lower: the picture changed less), for the erased "
           "concept's images and for the others. Recognised: share of the erased concept's images that the "
           f"other domain's classifier still labels right at >= {config.evaluate.recognised_confidence:g} "
           "confidence (the picture survived the erasure). Coherent UA: share of the erased concept's images "
           "that are erased and still recognised so (UA that does not count noise).", "",
           quality.format_markdown(summary["quality"]), ""]
  if summary and summary.get("sequential"):
    md += ["## Sequential unlearning (objects erased at once)", "", sequential_table(summary), ""]
    name = _figure(os.path.join(eval_dir, "sequential.png"), out_dir, "sequential.png", missing)
    if name:
      md += [f"![sequential]({name})", ""]
  md += attack_section(config, workdir, out_dir, missing)
  md += ["## Concept-latent association (scores stage)", ""]
  for run, label in ((layout.UNSUP_RUN, "unsupervised SAE (SAeUron)"), (layout.SUP_RUN, "supervised SAE (SAEmnesia)")):
    sdir = layout.sae_scores(workdir, run)
    rep = _read(os.path.join(sdir, artifacts.REPORT_FILE))
    if rep is None:
      missing.append(os.path.join(sdir, artifacts.REPORT_FILE))
      continue
    md += [f"### {label}", "", "```", association.format_report(rep), "```", ""]
    name = _figure(os.path.join(sdir, artifacts.PLOT_FILE), out_dir, f"association_{run}.png", missing)
    if name:
      md += [f"![association {run}]({name})", ""]
  runs = {run: _jsonl(layout.metrics_file(workdir, run)) for run in (layout.UNSUP_RUN, layout.SUP_RUN)}
  md += ["## SAE training", ""]
  for run, rows in runs.items():
    if not rows:
      missing.append(layout.metrics_file(workdir, run))
      continue
    last = rows[-1]
    vals = ", ".join(f"{k} {last[k]:.4g}" for k in ("fvu", "val_fvu", "val_loss", "dead_fraction", "object_acc",
                                                      "style_acc") if k in last)
    md.append(f"- {run}: step {last['step']}: {vals}")
  md.append("")
  if plot_training(runs, os.path.join(out_dir, "training.png")):
    md += ["![training curves](training.png)", ""]
  probe = _read(os.path.join(layout.probe_dir(config, workdir), "probe.json"))
  if probe:
    md += ["## Probe of the hooked block (held-out accuracy of map-mean activations)", ""]
    md += [f"- {d}: {r['accuracy']:.3f} (chance {r['chance']:.3f})" for d, r in probe["domains"].items()]
    md.append("")
  md += ["## Erasure grid (the same prompts without and with each method's chosen erasure)", ""]
  name = _figure(os.path.join(eval_dir, "erasure_grid.png"), out_dir, "erasure_grid.png", missing)
  if name:
    md += [f"![erasure grid]({name})", ""]
  unlearn_grid = os.path.join(layout.unlearn_dir(config, workdir), "grid.png")
  if os.path.isfile(unlearn_grid):
    _figure(unlearn_grid, out_dir, "unlearn_grid.png", missing)
    md += ["The unlearn stage's grid:", "", "![unlearn grid](unlearn_grid.png)", ""]
  if summary:
    md += ["## Per concept", "", per_concept_table(summary), ""]
  records = {s: _read(layout.pipeline_record(workdir, s)) for s in registry.PIPELINE_STEPS if s != "report"}
  if any(records.values()):
    md += ["## Stage wall times (the pipeline's records)", "", "| stage | wall (s) | finished |", "|---|---|---|"]
    md += [f"| {s} | {r['wall_s']:.1f} | {r['finished']} |" for s, r in records.items() if r]
    md.append("")
  md += ["## What produced it", "", f"- commit: `{_commit()}`",
         f"- written: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "- config:", "", "```json",
         json.dumps(config.to_dict(), indent=1, sort_keys=True, default=str), "```", ""]
  if missing:
    md += ["## Missing inputs", ""] + [f"- {m}" for m in missing] + [""]
  path = os.path.join(out_dir, "report.md")
  atomic_write_bytes(path, "\n".join(md).encode())
  return path


def run(config: ml_collections.ConfigDict) -> str:
  if jax.process_index() != 0:
    return ""
  c = config_defaults.quick_of(config) if config.pipeline.quick else config
  path = build(c, c.workdir)
  print(f"wrote {path}")
  return path


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call: the report's path."""
  del judge, progress
  return build(config, config.workdir)
