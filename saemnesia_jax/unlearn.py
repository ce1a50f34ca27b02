"""Stage `unlearn`: erase concepts now, and see it.

  python -m saemnesia_jax.unlearn --config configs/canvas_mini.py --config.unlearn.concepts="('Disk',)"
  python -m saemnesia_jax.unlearn --config configs/canvas_mini.py \\
      --config.unlearn.concepts="('Disk', 'Neon')" --config.unlearn.methods="('saemnesia',)" \\
      --config.unlearn.gamma=-10

Samples the same prompts and seeds without erasure and with each method's
erasure of all ``unlearn.concepts`` at once (the latent clamp at the SAE's
block), and writes ``{workdir}/unlearn/``: one PNG per (prompt, seed, method),
``grid.png`` (each row one prompt, each column a seed and a method) and
``manifest.json`` (the settings, the SAEs, and per image how much it changed:
the mean absolute pixel difference from the image without erasure).

Where the SAEs come from (``unlearn.sae_root``): for the shipped CanvasMini
model (``model.path='canvas_mini'``) the SAEs shipped beside it (sparsify
layout, with their scores and the evaluation's chosen gammas); for any other
pipeline (e.g. an SD v1.5 directory) ``{workdir}/sae_unsup`` and
``{workdir}/sae_sup`` as the train and scores stages write them, and the
settings chosen by its evaluate stage (``{workdir}/eval/summary.json``), or
``--config.unlearn.gamma`` (and ``percentile`` for SAeUron). A released
SAeUron SAE: ``--config.unlearn.methods="('saeuron',)"
--config.unlearn.sae_dir=... --config.unlearn.scores_dir=...``.

The stage is a thin wrapper over ``saemnesia_jax.api``.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("unlearn")

import os
import time

import ml_collections
import numpy as np

from saemnesia_jax import api
from saemnesia_jax.diffusion import erase as erase_lib
from saemnesia_jax.diffusion import setup as common
from saemnesia_jax.evaluation import images
from saemnesia_jax.runtime import layout
from saemnesia_jax.runtime.io_utils import atomic_write_json

RUNS = layout.RUN_OF_METHOD
FIELD_OF_SAE = "unlearn.sae_dir (one method) or --config.unlearn.sae_root"


sae_root = layout.unlearn_sae_root
sources = layout.unlearn_sources
chosen_path = layout.unlearn_chosen


def default_prompts(template: str, objects: list[str], styles: list[str], erased: list[tuple[str, str]],
                    n_with: int = 2, n_without: int = 2) -> tuple[list[str], list[bool]]:
  """``n_with`` prompts with each erased concept, then ``n_without`` with none of them;
  and per prompt whether it holds an erased concept."""
  gone = {n for _, n in erased}
  keep_o = [o for o in objects if o not in gone]
  keep_s = [s for s in styles if s not in gone]
  prompts, has = [], []
  for domain, name in erased:
    others = keep_s if domain == "object" else keep_o
    for i in range(min(n_with, max(1, len(others)))):
      other = others[i] if others else name
      o, s = (name, other) if domain == "object" else (other, name)
      prompts.append(template.format(object=o, style=s))
      has.append(True)
  for i in range(min(n_without, len(keep_o), len(keep_s))):
    prompts.append(template.format(object=keep_o[-1 - i], style=keep_s[-1 - i]))
    has.append(False)
  return prompts, has


def _holds(prompt: str, erased: list[tuple[str, str]]) -> bool:
  words = {w.strip(".,").lower() for w in prompt.split()}
  return any(all(w in words for w in n.lower().split()) for _, n in erased)


def run(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  u = config.unlearn
  if not u.concepts:
    raise ValueError("config.unlearn.concepts is empty: name what to erase, e.g. "
                     "--config.unlearn.concepts=\"('Disk',)\"")
  if not u.seeds:
    raise ValueError("config.unlearn.seeds is empty: give at least one seed, e.g. --config.unlearn.seeds=\"(188,)\"")
  t0 = time.perf_counter()
  out_dir = layout.unlearn_dir(config)
  pipe = api.load_pipeline(config)
  cpath = chosen_path(config)
  chosen = api.load_chosen(cpath) if cpath else {}
  gamma = float(u.gamma) if u.gamma else None
  percentile = float(u.percentile) if u.percentile else None
  erasures, used, names = {}, {}, None
  for m, (sae_dir, scores_dir) in sources(config).items():
    sae, tables = api.load_sae(sae_dir, field=FIELD_OF_SAE), api.load_scores(scores_dir)
    names = names or api.concept_names(tables)
    erasures[m] = api.erasure(sae, tables, list(u.concepts), m, gamma=gamma, percentile=percentile, chosen=chosen)
    used[m] = {"sae_dir": sae_dir, "scores_dir": scores_dir, "k": sae.k, "block": sae.block,
               "latents": [e.latents.tolist() for e in erasures[m].entries],
               "settings": {f"{d}/{n}": s for d, n, s in erasures[m].concepts}}
  first = next(iter(erasures.values()))
  erased = [(d, n) for d, n, _ in first.concepts]
  objects, styles = names
  if u.prompts:
    prompts = list(u.prompts)
    has = [_holds(p, erased) for p in prompts]
  else:
    prompts, has = default_prompts(config.concepts.style_template, objects, styles, erased)
  seeds = [int(s) for s in u.seeds]
  flat_p = [p for p in prompts for _ in seeds]
  flat_s = [s for _ in prompts for s in seeds]
  s = config.sampler
  # One compiled sampler for every column: the same k and clamp size (the identity is an empty erasure).
  ks = {e.sae.k for e in erasures.values()}
  if len(ks) > 1:
    print(f"note: the SAEs differ in k {sorted(ks)}: one compile per k")
  size = max(erase_lib.spec_size(e.entries) for e in erasures.values())
  kw = dict(guidance_scale=float(s.guidance_scale), num_steps=int(s.num_steps), height=int(s.height),
            width=int(s.width), batch_size=int(u.batch_size or min(len(flat_p), s.batch_size)),
            block=config.block, max_latents=size)
  columns = {}
  for m, e in [("none", first._replace(entries=(), concepts=()))] + list(erasures.items()):
    what = "no erasure" if m == "none" else f"erasing {', '.join(f'{d} {n}' for d, n, _ in e.concepts)} " \
        f"({sum(len(x.latents) for x in e.entries)} latents)"
    print(f"{m}: {len(flat_p)} images ({len(prompts)} prompts x {len(seeds)} seeds), {what}", flush=True)
    columns[m] = api.sample(pipe, flat_p, flat_s, e, progress=progress, **kw)
  wall = time.perf_counter() - t0
  names = list(columns)
  h, w = columns["none"].shape[1:3]
  scale = max(1, 96 // w)
  # Rows: prompts; columns: seed-major, then method.
  cells, files, change = [], [], []
  for i, p in enumerate(prompts):
    for j, seed in enumerate(seeds):
      for m in names:
        img = columns[m][i * len(seeds) + j]
        cells.append(img)
        f = f"{i:02d}_seed{seed}_{m}.png"
        images.save_png(os.path.join(out_dir, f), img, scale)
        d = float(np.abs(img - columns["none"][i * len(seeds) + j]).mean())
        files.append({"file": f, "prompt": p, "seed": seed, "method": m, "holds_erased": has[i],
                      "mean_abs_change": d})
  col_labels = [f"{seed} {m}" for seed in seeds for m in names]
  g = images.grid(np.stack(cells), len(prompts), len(col_labels), scale=scale, row_labels=prompts,
                  col_labels=col_labels, label_width=6 * max(len(p) for p in prompts) + 6)
  images.save_image(os.path.join(out_dir, "grid.png"), g)
  summary = {m: {"with": _mean([f["mean_abs_change"] for f in files if f["method"] == m and f["holds_erased"]]),
                 "without": _mean([f["mean_abs_change"] for f in files if f["method"] == m and not f["holds_erased"]])}
             for m in erasures}
  manifest = {"stage": "unlearn", "concepts": [f"{d}/{n}" for d, n in erased], "methods": used,
              "chosen": cpath, "model": pipe.path, "block": config.block, "prompts": prompts,
              "holds_erased": has, "seeds": seeds, "columns": col_labels, "images": files,
              "mean_abs_change": summary, "wall_s": wall, "config": common.config_json(config)}
  atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
  for m, v in summary.items():
    settings = ", ".join(f"{k} {x}" for k, x in used[m]["settings"].items())
    print(f"{m} ({settings}): mean |change| {v['with']:.3f} on prompts with the concept, "
          f"{v['without']:.3f} without")
  print(f"wrote {len(files)} images, grid.png and manifest.json to {out_dir} in {wall:.1f} s")
  return manifest


def _mean(xs):
  return float(np.mean(xs)) if xs else float("nan")

