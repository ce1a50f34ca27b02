"""Where does an erasure turn CanvasMini images into noise? Per sampling step.

  python benchmarks/erasure_diagnosis.py                       # Disk, Square, Stripes, Checker
  python benchmarks/erasure_diagnosis.py --concepts Disk --rules paper,self:-1

For each concept, each method (the shipped CanvasMini SAEs with their chosen
settings) and each rule, samples the concept's prompts (in every style, or
every object) at one held-out seed with a clamp that also reports, per step,
through ``jax.debug.callback``:

* ``edited``: share of the block's tokens where the clamp acts;
* ``push``: over the edited tokens, mean ||decode(z_edit) - decode(z)|| / ||x||
  (the edit against the block output it is added to);
* ``z_edit``: the most negative value an edited latent is set to, against
  ``z_max``: the largest value that latent takes at that step *without*
  erasure (the SAE's own range there);
* ``norm_ratio``: the largest edited token norm over the largest norm without
  erasure (how far the block output leaves its usual range).

Then per run: UA on these images (the concept's own classifier), the share
recognised by the other domain's classifier (>= 0.8 confidence), and the FD of
the judge features against the same prompts unerased (evaluation/quality.py).
Rules: ``paper`` (the chosen gamma x mu_target) or ``self:<gamma>`` (z <- gamma
x z, clamp.with_rules scale='self'), each optionally followed by
``|steps=<share>`` / ``|threshold=zero`` (e.g. ``paper|steps=0.4``). Prints a table and writes JSON and a
figure (--out, default benchmarks/results/canvas_mini/erasure_diagnosis.*).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--concepts", default="Disk,Square,Stripes,Checker")
  ap.add_argument("--methods", default="saemnesia,saeuron")
  ap.add_argument("--rules", default="paper,self:-1,self:0")
  ap.add_argument("--seed", type=int, default=188)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "canvas_mini", "erasure_diagnosis"))
  a = ap.parse_args()
  import jax
  import jax.numpy as jnp
  from saemnesia_jax import api
  from saemnesia_jax.diffusion import clamp
  from saemnesia_jax.diffusion import erase as erase_lib
  from saemnesia_jax.evaluation import quality
  from saemnesia_jax.sae import model as sae_lib
  from saemnesia_jax.judges.canvas_mini import CanvasMiniJudge
  from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec, sample_prompts
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import canvas_mini
  config = canvas_mini.get_config()
  pipe = api.load_pipeline("canvas_mini")
  judge = CanvasMiniJudge()
  chosen = api.load_chosen(api.SHIPPED_CHOSEN)
  ev_steps = int(config.evaluate.num_steps or config.sampler.num_steps)
  stats: dict = collections.defaultdict(lambda: collections.defaultdict(list))
  current = {"run": ""}

  def record(step, edited, push, z_edit, z_max, norm_out, norm_in):
    s = stats[current["run"]]
    for k, v in (("edited", edited), ("push", push), ("z_edit", z_edit), ("z_max", z_max),
                 ("norm_out", norm_out), ("norm_in", norm_in)):
      s[k].append((int(step), float(v)))

  def diag_edit_fn(k):
    def edit_fn(edit_params, x, step):
      sae_params, spec = edit_params
      out = clamp.clamp(sae_params, spec, x, step, k)
      t = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
      d = out.reshape(t.shape).astype(jnp.float32) - t
      dn, xn = jnp.linalg.norm(d, axis=-1), jnp.linalg.norm(t, axis=-1)
      on = dn > 0
      values, indices = sae_lib.topk(sae_lib.encode_pre(sae_params, t), k)  # as the clamp sees z
      z = jnp.einsum("nk,nkm->nm", values, (indices[:, :, None] == spec.latents[None, None, :]).astype(values.dtype))
      act = spec.active[step][None] & (spec.multiplier[step][None] != 0)
      z_edit = jnp.where(act & (z > spec.threshold[step][None]), spec.multiplier[step][None] * z, jnp.inf)
      jax.debug.callback(record, step, on.mean(), jnp.sum(jnp.where(on, dn / (xn + 1e-6), 0)) / jnp.maximum(on.sum(), 1),
                         jnp.min(z_edit), jnp.max(jnp.where(act, z, -jnp.inf)),
                         jnp.max(jnp.linalg.norm(out.reshape(t.shape).astype(jnp.float32), axis=-1)), jnp.max(xn))
      return out
    return edit_fn

  objects, styles = list(config.concepts.objects), list(config.concepts.styles)
  samplers, rows = {}, []
  for method in a.methods.split(","):
    sae = api.load_sae(api.SHIPPED[method])
    tables = api.load_scores(api.shipped_scores(method))
    key = (sae.block, sae.k)
    if key not in samplers:
      samplers[key] = Sampler(pipe, SamplerSpec(num_steps=ev_steps, batch_size=int(config.sampler.batch_size),
                                                edit_block=sae.block), diag_edit_fn(sae.k))
    s = samplers[key]
    for name in a.concepts.split(","):
      domain, index, name = erase_lib.find_concept(name, objects, styles)
      if domain == "object":
        prompts = [f"A {name} image in {st} style." for st in styles]
        true_other = np.arange(len(styles))
      else:
        prompts = [f"A {o} image in {name} style." for o in objects]
        true_other = np.arange(len(objects))
      seeds = [a.seed] * len(prompts)
      setting = dict(chosen[erase_lib.setting_key(method, domain, name)])
      base_entry = erase_lib.concept_entry(method, tables, domain, index, setting, assignment=sae.assignment)
      # The same latents and steps with multiplier 1: no change, the unerased statistics.
      ident = clamp.Entry(base_entry.latents, base_entry.active, np.ones_like(base_entry.mu),
                          np.full_like(base_entry.threshold, -np.inf), 1.0)
      runs = [("none", ident)]
      for rule in a.rules.split(","):
        # "paper" or "self:<gamma>", then optional "|key=value" rules (clamp.with_rules).
        head, *extra = rule.split("|")
        rules = dict(kv.split("=") for kv in extra)
        for k in ("steps", "start"):
          if k in rules:
            rules[k] = float(rules[k])
        if head == "paper":
          s_rule = {**setting, **rules}
        else:
          s_rule = {**setting, "gamma": float(head.split(":")[1]), "scale": "self", **rules}
        runs.append((rule, erase_lib.concept_entry(method, tables, domain, index, s_rule,
                                                   assignment=sae.assignment)))
      out = {}
      for label, entry in runs:
        current["run"] = f"{method}/{name}/{label}"
        spec = clamp.build_spec([entry], s.timesteps, tables["timesteps"], 32)
        t0 = time.perf_counter()
        imgs = sample_prompts(s, prompts, seeds, config.sampler.guidance_scale, edit_params=(sae.params, spec),
                              progress=False)
        jax.effects_barrier()
        out[label] = (judge.assess(imgs), imgs, time.perf_counter() - t0)
      base_a = out["none"][0]
      for label, (res, imgs, wall) in out.items():
        own, other = (res["object"], res["style"]) if domain == "object" else (res["style"], res["object"])
        conf = res["style_conf"] if domain == "object" else res["object_conf"]
        st = stats[f"{method}/{name}/{label}"]
        ref = stats[f"{method}/{name}/none"]
        steps = sorted({i for i, _ in st["push"]})
        per = lambda key, src=st: [float(np.mean([v for i, v in src[key] if i == j])) for j in steps]
        z_max = per("z_max", ref)
        row = {"method": method, "concept": name, "domain": domain, "rule": label,
               "setting": setting if label == "paper" else (label if label != "none" else "no erasure"),
               "UA": float(np.mean(own != index)),
               "recognised": quality.recognised_share(true_other, other, conf, 0.8),
               "FD": quality.frechet_distance(res["features"], base_a["features"]),
               "edited_mean": float(np.mean(per("edited"))), "push_mean": float(np.mean(per("push"))),
               "push_max": float(np.max(per("push"))),
               "z_edit_over_z_max": float(np.min(np.array(per("z_edit")) / np.maximum(z_max, 1e-6))),
               "norm_ratio_max": float(np.max(np.array(per("norm_out")) / np.maximum(per("norm_in", ref), 1e-6))),
               "per_step": {k: per(k) for k in ("edited", "push", "z_edit", "norm_out")} | {"z_max": z_max},
               "wall_s": round(wall, 1)}
        rows.append(row)
        print(f"{method:9s} {name:9s} {label:20s} UA {row['UA']:.2f} recognised {row['recognised']:.2f} "
              f"FD {row['FD']:8.2f}  edited {row['edited_mean']:.3f} push mean {row['push_mean']:7.2f} "
              f"max {row['push_max']:7.2f}  z_edit/z_max {row['z_edit_over_z_max']:8.1f}  "
              f"norm x{row['norm_ratio_max']:.1f}", flush=True)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out + ".json", "w") as f:
    json.dump({"rows": rows, "seed": a.seed, "steps": ev_steps, "loadavg": os.getloadavg()}, f, indent=1)
  _plot(rows, a.out + ".png")
  print(f"wrote {a.out}.json and .png")


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  erased = [r for r in rows if r["rule"] != "none"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
  for r in erased:
    lab = f"{r['method']} {r['concept']} {r['rule']}"
    axes[0].plot(r["per_step"]["push"], label=lab)
    axes[1].plot(np.array(r["per_step"]["z_edit"]) / np.maximum(r["per_step"]["z_max"], 1e-6), label=lab)
  axes[0].set_ylabel("||edit|| / ||block output|| (edited tokens)")
  axes[1].set_ylabel("edited latent value / its max unerased")
  for ax in axes:
    ax.set_xlabel("sampling step (0 = noisiest)")
    ax.set_yscale("symlog")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
