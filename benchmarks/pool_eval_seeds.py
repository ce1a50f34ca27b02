"""Table 1 over more held-out seeds, from evaluations that differ only in them.

  python benchmarks/pool_eval_seeds.py --config configs/canvas_mini.py \\
      --runs /tmp/sb2/eval_noobj3 /tmp/sb2/eval_noobj3_more --out five_seeds.json

The second run is the first rerun with ``--config.evaluate.eval_seeds=<other
seeds>`` and ``--config.evaluate.chosen_from=<first run>/summary.json``: the
same settings on other seeds, so only its finals are sampled. Per row and
concept this pools the final answer sets (and judge features) of every run,
then scores them as the evaluation does (UA / IRA / CRA per concept, averaged
as Table 1; FD, recognised and coherent UA against the pooled no-erasure
images). Rows are those every run has, with the same chosen settings (an
error otherwise). FD is biased by the number of images, so compare it only
within one pooled table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from saemnesia_jax.evaluation import plan as evaluate_plan
from saemnesia_jax.evaluation import metrics
from saemnesia_jax.evaluation import quality
from saemnesia_jax.runtime import units as units_lib
from saemnesia_jax.runtime.cli import load_config_file
from saemnesia_jax.runtime.io_utils import atomic_write_json, read_json

COLS = ("style_UA", "style_IRA", "style_CRA", "object_UA", "object_IRA", "object_CRA")


def finals(run: str) -> dict[tuple, dict]:
  """(method, domain, concept, setting) -> final unit of ``run``; the
  no-erasure unit under ('none',)."""
  out = {}
  for path in glob.glob(os.path.join(run, "units", units_lib.UNITS_DIR, "*.json")):
    unit = read_json(path)["unit"]
    if unit.get("phase") != "final" or len(unit.get("erase", [None])) != 1:
      continue
    key = ("none",) if unit["method"] == "none" else (
        unit["method"], unit["domain"], unit["concept"], json.dumps(unit["setting"], sort_keys=True))
    out[key] = unit
  return out


def pooled_rows(config, runs: list[str]) -> dict[str, dict]:
  summaries = [read_json(os.path.join(r, "summary.json")) for r in runs]
  chosen = summaries[0]["chosen"]
  for r, s in zip(runs[1:], summaries[1:]):
    differ = [k for k in chosen if k in s["chosen"] and s["chosen"][k] != chosen[k]]
    if differ:
      raise SystemExit(f"{r} chose other settings than {runs[0]} (e.g. {differ[0]}): rerun it with "
                       f"--config.evaluate.chosen_from={runs[0]}/summary.json")
  labels = sorted({k.rsplit("/", 2)[0] for k in chosen if all(k in s["chosen"] for s in summaries)})
  stores = [units_lib.UnitResults(os.path.join(r, "units")) for r in runs]
  index = [finals(r) for r in runs]

  def pool(key):
    parts, feats = [], []
    for store, idx, run in zip(stores, index, runs):
      if key not in idx:
        raise SystemExit(f"{run} has no final unit for {key}: run its evaluation to the end")
      parts.append(store.read(idx[key]))
      feats.append(store.read_arrays(idx[key]).get("features"))
    return evaluate_plan.pool_answers(parts), (np.concatenate(feats) if all(f is not None for f in feats) else None)

  _, base = pool(("none",))
  targets = evaluate_plan.targets(config)
  out = {}
  for label in labels:
    rows, by_domain = [], {"object": [], "style": []}
    for d, n in targets:
      setting = json.dumps(chosen[f"{label}/{d}/{n}"], sort_keys=True)
      r, f = pool((label.split(" ")[0], d, n, setting))
      rows.append({"domain": d, **evaluate_plan.unit_metrics(r, d, [n], config)})
      by_domain[d].append(evaluate_plan.answer_quality(config, r, d, n, f, base))
    out[label] = {"table": metrics.average_table(rows),
                  "quality": {d: quality.mean_rows(v) for d, v in by_domain.items()}}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, help="the config the evaluations ran with (concepts, judge threshold)")
  ap.add_argument("--runs", nargs="+", required=True, help="evaluation out_dirs; the first one's choices are used")
  ap.add_argument("--out", default="", help="JSON of the pooled table and quality (default: print only)")
  args = ap.parse_args()
  if len(args.runs) < 2:
    ap.error("give two or more --runs to pool")
  rows = pooled_rows(load_config_file(args.config), args.runs)
  print("| row | " + " | ".join(COLS) + " | avg | coherent UA, object / style | FD erased, object / style "
        "| FD other, object / style |")
  print("|---" * (len(COLS) + 5) + "|")
  for label, v in rows.items():
    t, q = v["table"], v["quality"]
    pair = lambda key, fmt: " / ".join(fmt(q[d].get(key, float("nan"))) for d in ("object", "style"))
    print(f"| {label} | " + " | ".join(f"{100 * t[c]:.2f}" for c in COLS) + f" | {100 * t['avg']:.2f} | "
          + pair("coherent", lambda x: f"{100 * x:.1f}") + " | " + pair("FD_erased", lambda x: f"{x:,.0f}")
          + " | " + pair("FD_kept", lambda x: f"{x:,.0f}") + " |")
  if args.out:
    atomic_write_json(args.out, {"runs": args.runs, "rows": rows})
    print("wrote", args.out)


if __name__ == "__main__":
  main()
