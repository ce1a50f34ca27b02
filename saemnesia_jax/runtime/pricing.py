"""The whole run priced before renting it: ``pipeline --config.dry_run=True``.

  python -m saemnesia_jax.pipeline --config configs/sd15.py --config.dry_run=True --config.topology=v5p-8

The pipeline's dry run compiles each step's programs (``runtime/sizing.py``)
and hands their roofline rates to ``price``, which multiplies them by the
work the config asks for (``work``: images sampled, tokens trained), counted
from the config alone: collect's prompts x seeds per hooked block, the
store's tokens x epochs per SAE, evaluate's sweep, development, final and
sequential units x the answer set.

What a figure means:

* a rate is the compiler's roofline (max of FLOPs / bf16 peak and bytes /
  HBM bandwidth) for one call: a lower bound on time, so wall times are
  lower bounds too (real TPU steps reach 40-70% of a roofline);
* the SAE steps use the whole slice (their mesh); the samplers run one
  unsharded jit per process, so a slice samples on as many chips as it runs
  processes: one per host by default (``sampling_chips``), every chip with
  one process per chip (the figure beside it);
* scores run the SAE encoder over the store once per SAE; they are priced
  at that SAE's train-step rate (an upper bound: no backward);
* SAEmnesia's fine-tune is priced at its ``train.epochs`` (early stopping
  ends it sooner: an upper bound).

JAX-free: counts and arithmetic only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

ANCHOR_LINES = 80  # lines per object in UnlearnCanvas' sd_prompt_<object>.txt (SAeUron's collection)


@dataclasses.dataclass(frozen=True)
class Line:
  """One step's work on the slice."""
  step: str  # pipeline step (and block)
  program: str  # the compiled program whose rate prices it
  work: float  # images or tokens
  unit: str  # "images" | "tokens"
  rate: float  # work per second of one call's roofline, on the chips that run it
  chips_busy: int  # chips the program runs on
  note: str = ""

  @property
  def wall_s(self) -> float:
    return self.work / self.rate if self.rate > 0 else float("inf")


def collect_images(config: Any, grid_len: int | None = None) -> tuple[int, str]:
  """(trajectories per block, how they were counted): ``grid_len`` prompts (the
  concept grid, or the anchor files read here), else ``ANCHOR_LINES`` per object."""
  c, k = config.collect, config.concepts
  seeds = len(tuple(c.seeds))
  if grid_len is not None:
    return grid_len * seeds, f"{grid_len} prompts x {seeds} seed(s)"
  per_object = int(c.prompts_per_object) or ANCHOR_LINES
  themes = len(k.styles) + (1 if k.get("no_style", "") else 0) + 1  # every style, the no-style theme, the bare line
  how = (f"{per_object} anchor lines per object assumed (no files at collect.anchor_prompts_dir here)"
         if not c.prompts_per_object else f"collect.prompts_per_object={per_object}")
  return len(k.objects) * per_object * themes * seeds, how


def hosts(slice_chips: int, generation: str) -> int:
  """Hosts (processes by default) of a Cloud TPU slice: 4 chips per host, but one
  host holds the 8 chips of a v5e-8 / v6e-8."""
  if generation in ("v5e", "v6e") and slice_chips <= 8:
    return 1
  return max(1, slice_chips // 4)


def price(lines: list[Line], slice_chips: int) -> dict:
  """Per line and in all: wall seconds and chip-hours on a slice of ``slice_chips``
  (the whole slice is rented for every step, busy or not)."""
  rows = [{**dataclasses.asdict(ln), "wall_s": ln.wall_s, "chip_hours": ln.wall_s * slice_chips / 3600}
          for ln in lines]
  wall = sum(r["wall_s"] for r in rows)
  return {"lines": rows, "wall_s": wall, "chip_hours": wall * slice_chips / 3600, "slice_chips": slice_chips}


def duration(s: float) -> str:
  if s != s or s == float("inf"):
    return "-"
  if s >= 86400:
    return f"{s / 86400:.1f} d"
  if s >= 3600:
    return f"{s / 3600:.1f} h"
  if s >= 60:
    return f"{s / 60:.1f} min"
  return f"{s:.1f} s"


def table(priced: dict, title: str) -> str:
  out = [title, "", "| step | work | rate (roofline) | chips busy | wall | chip-hours | note |",
         "|---|---|---|---|---|---|---|"]
  for r in priced["lines"]:
    out.append(f"| {r['step']} | {r['work']:,.0f} {r['unit']} | {r['rate']:,.1f} {r['unit']}/s | "
               f"{r['chips_busy']} | {duration(r['wall_s'])} | {r['chip_hours']:,.1f} | {r['note']} |")
  out.append(f"| **all** | | | {priced['slice_chips']} rented | **{duration(priced['wall_s'])}** | "
             f"**{priced['chip_hours']:,.0f}** | lower bounds: the compiler's roofline |")
  return "\n".join(out)

