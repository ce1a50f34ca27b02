"""The README's TPU table from pipeline dry runs, one folder per slice.

  python -m saemnesia_jax.pipeline --config configs/sd15.py --config.dry_run=True \
      --config.topology=v5p-8 --config.sae.matmul_dtype=bfloat16 --config.workdir=runs/dry
  cp -r runs/dry/dry_run runs/dry_v5p-8          # once per slice
  python benchmarks/tpu_table.py runs/dry_v5p-8 runs/dry_v5p-64 ... [--json out.json]

Each folder holds ``pipeline.json`` and ``pipeline_<step>.json`` (the dry run's
records); one markdown row per slice: per chip memory against HBM, whether it
fits, the roofline rate, the collectives per step, and the whole run's wall time
and chip-hours (lower bounds: the compiler's roofline).
"""
import argparse
import json
import os

from saemnesia_jax.runtime import hlo_stats, pricing


def _program(d: dict, unit: str) -> str:
  a = d["program"]
  mem = a["per_device_bytes"]["total"]
  fits = "fits" if a["fits"] else "**does not fit**"
  rate = a["throughput"]
  rate = f"{rate / 1e6:.2f} M {unit}/s" if rate >= 1e5 else f"{rate:.2f} {unit}/s"
  return f"{hlo_stats.size(mem)} of {hlo_stats.size(a['hbm_bytes'])}, {fits}; {rate}"


def _collectives(d: dict) -> str:
  return hlo_stats.summary(d["program"]["collectives"])


def row(folder: str) -> tuple[str, dict]:
  read = lambda name: json.load(open(os.path.join(folder, name)))  # noqa: E731
  steps = {s: read(f"pipeline_{s}.json")["dry_run"] for s in ("collect", "train", "train_sup", "evaluate")}
  whole = read("pipeline.json")
  per_chip = whole.get("one_per_chip", whole["one_per_host"])
  cells = [f"{whole['topology']} ({whole['chips']} chips, {whole['hosts']} host(s))",
           _program(steps["train"], "tokens") + "; " + _collectives(steps["train"]),
           _program(steps["train_sup"], "tokens") + "; " + _collectives(steps["train_sup"]),
           _program(steps["collect"], "images") + " per chip",
           _program(steps["evaluate"], "images") + " per chip",
           f"{pricing.duration(whole['one_per_host']['wall_s'])} / {pricing.duration(per_chip['wall_s'])}; "
           f"{whole['one_per_host']['chip_hours']:,.0f} / {per_chip['chip_hours']:,.0f} chip-hours"]
  return "| " + " | ".join(cells) + " |", {"topology": whole["topology"], "steps": steps, "whole": whole}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("folders", nargs="+")
  p.add_argument("--json", default="")
  args = p.parse_args()
  print("| slice | SAeUron SAE step (4,096 tokens, bf16 matmuls): per chip, rate, collectives per step | "
        "SAEmnesia fine-tune step (128 maps, 8 micro-batches) | capture sampler, 8 images of 512 px, 50 steps | "
        "clamp sampler, 8 images of 512 px with CFG, 100 steps | whole Table 1: wall, samplers on one chip per host / "
        "on every chip; chip-hours |")
  print("|---|---|---|---|---|---|")
  out = []
  for f in args.folders:
    line, rec = row(f)
    print(line)
    out.append(rec)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
