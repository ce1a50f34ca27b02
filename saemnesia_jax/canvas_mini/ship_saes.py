"""Ship the CanvasMini SAEs beside the shipped model, for the unlearn stage.

  python -m saemnesia_jax.canvas_mini.ship_saes --config configs/canvas_mini.py \\
      --config.unlearn.chosen=benchmarks/results/canvas_mini/summary.json

after collect, train, scores, train and scores of configs/canvas_mini_sup.py
(or the pipeline's first six stages) in ``config.workdir``. Copies into
``saemnesia_jax/assets/canvas_mini/``: ``sae_unsup/`` and ``sae_sup/``, each
with ``export/`` (sparsify layout: cfg.json, sae.safetensors, saemnesia.json)
and ``scores/`` (what the clamp reads: mu, thresholds, the importance scores
for SAeUron, the timesteps, the assignment; compressed, float32 as computed),
and ``chosen.json``: the evaluation's chosen setting per method and concept
(from ``unlearn.chosen``: an evaluate summary.json; '' -> {workdir}/eval/summary.json).
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("canvas_mini.ship_saes")

import os
import shutil

import ml_collections
import numpy as np

from saemnesia_jax.canvas_mini import ASSET_DIR
from saemnesia_jax.evaluation import variants
from saemnesia_jax.runtime import layout
from saemnesia_jax.runtime.io_utils import atomic_write_json, read_json
from saemnesia_jax.sae import artifacts as scores_lib
from saemnesia_jax.sae import sparsify_io

# The arrays of scores.npz the clamp and the API read, per run.
KEEP = {layout.UNSUP_RUN: ("mu_objects", "mu_styles", "threshold_objects", "threshold_styles", "scores_objects",
                      "scores_styles", "counts_objects", "counts_styles", "timesteps", "assignment", "objects",
                      "styles"),
        layout.SUP_RUN: ("mu_objects", "mu_styles", "threshold_objects", "threshold_styles", "counts_objects",
                    "counts_styles", "timesteps", "assignment", "objects", "styles")}


def ship(workdir: str, chosen_path: str, dest: str = ASSET_DIR) -> dict:
  sizes = {}
  for run, keep in KEEP.items():
    src, out = os.path.join(workdir, run), os.path.join(dest, run)
    for sub in (layout.EXPORT, layout.SCORES):
      os.makedirs(os.path.join(out, sub), exist_ok=True)
    for f in (sparsify_io.CFG_FILE, sparsify_io.WEIGHTS_FILE, "saemnesia.json"):
      shutil.copyfile(os.path.join(src, layout.EXPORT, f), os.path.join(out, layout.EXPORT, f))
    tables = scores_lib.load_scores(os.path.join(src, layout.SCORES))
    np.savez_compressed(os.path.join(out, layout.SCORES, scores_lib.SCORES_FILE), **{k: tables[k] for k in keep})
    for f in (scores_lib.ASSIGNMENT_FILE, scores_lib.REPORT_FILE):
      shutil.copyfile(os.path.join(src, layout.SCORES, f), os.path.join(out, layout.SCORES, f))
    manifest = read_json(os.path.join(src, layout.SCORES, scores_lib.MANIFEST_FILE))
    manifest["shipped"] = {"arrays": list(keep), "from": os.path.join(src, layout.SCORES)}
    atomic_write_json(os.path.join(out, layout.SCORES, scores_lib.MANIFEST_FILE), manifest)  # last: complete
    sizes[run] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  ship_chosen(chosen_path, dest)
  return sizes


def ship_chosen(chosen_path: str, dest: str = ASSET_DIR) -> None:
  """chosen.json: the evaluation's table and chosen settings, each method's
  plain key at its headline row (evaluation/variants.headline_choices)."""
  summary = read_json(chosen_path)
  atomic_write_json(os.path.join(dest, "chosen.json"), {
      "source": os.path.relpath(chosen_path), "table": summary.get("table"),
      "headline": summary.get("headline") or {}, "chosen": variants.headline_choices(summary)})


def run(config: ml_collections.ConfigDict) -> dict:
  chosen = config.unlearn.chosen or layout.eval_summary_in(config.workdir)
  sizes = ship(config.workdir, chosen)
  for run_name, n in sizes.items():
    print(f"{run_name}: {n / 1e6:.2f} MB in {os.path.join(ASSET_DIR, run_name)}")
  return sizes

