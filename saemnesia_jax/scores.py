"""Stage `scores`: SAeUron importance scores of a trained SAE, the greedy
concept -> latent assignment, and the concept-latent association report.

  python -m saemnesia_jax.scores --config configs/canvas_mini.py
  python -m saemnesia_jax.scores --config configs/canvas_mini.py \\
      --config.scores.sae_dir=runs/canvas_mini/sae_sup/export

What it computes (docs/method.md section 4):

1. For every stored map (one prompt at one sampling step) of the activation
   store, the SAE's per-token TopK codes (k from the SAE's cfg.json; per-token
   TopK as at inference, also for an SAE trained with BatchTopK) averaged over
   the map's tokens: (n_latents,).
2. Sums and counts of these per (concept, step), batch by batch on the device
   (``importance.concept_sums``), so the store never needs to fit in memory.
   Two domains, each with its own "not c" pool as in SAeUron: objects (every
   map counts for its object, styled or not) and styles (every map with a
   style counts for it; maps with style -1, the anchor prompts, count for no
   style).
3. mu_c(i, t) = sums / counts, the importance score s(i, t, c)
   (``importance.importance_scores``) and the clamp threshold (mean of mu over
   the domain's concepts, ``importance.clamp_threshold``).
4. The greedy assignment (``supervised.greedy_assignment``: objects first,
   then styles, each concept takes its best free latent; scores averaged over
   steps) for the SAEmnesia fine-tune.
5. The association report (``evaluation/association.py``): for each concept, how much
   of its positive score mass sits in its best latent, how many latents it
   takes to reach ``mass_fraction`` (90%) of it, and for a supervised SAE the
   share and rank of the *assigned* latent.

Inputs: the SAE folder written by the trainer (sparsify layout, cfg.json +
sae.safetensors, plus saemnesia.json: mode, store_identity, block, objects,
styles, assignment); an SAE without saemnesia.json (e.g. SAeUron's released
ones) is accepted as unsupervised, without the store identity check. The SAE
must fit the store: same d_in, and (if saemnesia.json records it) the same
block and model weights hash.

Config fields (all optional; a config without a ``scores`` section uses the
defaults in ``DEFAULTS``)::

  scores.sae_dir        ''  -> {workdir}/sae_unsup/export
  scores.out_dir        ''  -> {sae_dir}/../scores (beside the SAE run)
  scores.batch_size     256 maps per device batch; the device holds the
                        pre-TopK latents of a batch: batch * tokens_per_map *
                        n_latents * 4 bytes (5.4 GB at SD scale with 256).
  scores.split          'all' | 'train' | 'val' (the store reader's split)
  scores.val_fraction   0.0 (with split 'train'/'val': the trainer's value)
  scores.split_seed     0   (likewise)
  scores.mass_fraction  0.9 (the report's "latents to reach this share")

plus the shared ``workdir``, ``collect.store_path`` ('' -> {workdir}/
activations) and ``concepts`` (checked against the store's concept names).

Outputs in out_dir (each written atomically; manifest.json last, so a
folder with a manifest is complete):

  scores.npz       mu_objects (n_obj, S, L), mu_styles (n_sty, S, L),
                   scores_objects, scores_styles (same shapes),
                   counts_objects (n_obj, S), counts_styles (n_sty, S)
                   (maps per cell), threshold_objects, threshold_styles
                   (S, L), timesteps (S,) (scheduler timestep of each step;
                   -1 for a step with no map), assignment (n_obj + n_sty,)
                   int32, objects, styles (names). float32 unless noted.
  assignment.json  {"objects": {name: latent}, "styles": {name: latent},
                   "object_names", "style_names" (concept order),
                   "latents": [ids, objects then styles], ...}: what the
                   supervised fine-tune loads (``load_assignment``).
  report.json      the association report (``association_report``)
  report.png       top-1 (and assigned) share per concept; mean cumulative
                   score mass vs number of latents per domain
  manifest.json    what produced these: SAE folder + sha256 of its
                   safetensors, store path + identity, config, settings.

Single process: every process would compute the same tables, so only
process 0 writes.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("scores")

import functools
import io
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from saemnesia_jax import store as store_lib
from saemnesia_jax.diffusion import blocks
from saemnesia_jax.evaluation.association import AGGREGATION, association_report, format_report, plot_report
from saemnesia_jax.runtime import config_defaults, layout, runs
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, atomic_write_json, hash_files
from saemnesia_jax.sae import importance as imp
from saemnesia_jax.sae import model as sae_lib
from saemnesia_jax.sae import sparsify_io, supervised
from saemnesia_jax.sae.artifacts import (ASSIGNMENT_FILE, FORMAT,  # noqa: F401 (the stage's readers, re-exported)
                                         MANIFEST_FILE, META_FILE, PLOT_FILE, REPORT_FILE, SCORES_FILE, VERSION,
                                         ScoresError, check_sae_fits_store, load_assignment, load_sae, load_scores)

DEFAULTS = config_defaults.SCORES
DOMAINS = ("objects", "styles")


# --------------------------------------------------------------------------
# Settings and inputs


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The scores settings of ``config`` (``DEFAULTS`` for absent fields), paths resolved.

  Returns DEFAULTS' keys plus ``store_path``; ``sae_dir``, ``out_dir`` and
  ``store_path`` are absolute.
  """
  section = config.get("scores", None)
  section = {} if section is None else dict(section)
  unknown = sorted(set(section) - set(DEFAULTS))
  if unknown:
    raise ScoresError(f"config.scores has unknown fields {unknown}; known fields: {sorted(DEFAULTS)}")
  s = {**DEFAULTS, **section}
  workdir = config.get("workdir", "") or "."
  s["sae_dir"] = os.path.abspath(s["sae_dir"] or layout.sae_export(workdir, layout.UNSUP_RUN))
  s["out_dir"] = os.path.abspath(s["out_dir"] or os.path.join(os.path.dirname(s["sae_dir"]), layout.SCORES))
  collect = config.get("collect", None)
  store_path = collect.get("store_path", "") if collect is not None else ""
  s["store_path"] = os.path.abspath(store_path or layout.default_store(workdir))
  if int(s["batch_size"]) < 1:
    raise ScoresError(f"config.scores.batch_size must be >= 1 (maps per batch), got {s['batch_size']}")
  if s["split"] not in ("all", "train", "val"):
    raise ScoresError(f"config.scores.split must be 'all', 'train' or 'val', got {s['split']!r}")
  if not 0.0 < float(s["mass_fraction"]) <= 1.0:
    raise ScoresError(f"config.scores.mass_fraction must be in (0, 1], got {s['mass_fraction']}")
  return s


def _concept_names(store: store_lib.Store, meta: Mapping[str, Any] | None,
                   config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """Object and style names of the store, checked against the config and the SAE."""
  grid = store.manifest["identity"].get("prompt_grid", {})
  objects, styles = grid.get("objects"), grid.get("styles")
  concepts = config.get("concepts", None)
  if objects is None:
    if concepts is None:
      raise ScoresError(f"the store at {store.path} names no concepts (identity.prompt_grid.objects) and the "
                        "config has no concepts section: add config.concepts (objects, styles)")
    objects, styles = list(concepts.objects), list(concepts.styles)
  objects, styles = list(objects), list(styles or [])
  sources = [("config.concepts", concepts)] + [(f"{META_FILE} of the SAE", meta)]
  for where, src in sources:
    if src is None or src.get("objects") is None:
      continue
    theirs = (list(src.get("objects")), list(src.get("styles") or []))
    if theirs != (objects, styles):
      raise ScoresError(
          f"the concepts of {where} differ from those of the store at {store.path}:\n"
          f"  {where}: objects {theirs[0]}, styles {theirs[1]}\n"
          f"  store: objects {objects}, styles {styles}\n"
          "Use the store collected for these concepts (config.collect.store_path) or the matching config/SAE.")
  if not objects:
    raise ScoresError(f"the store at {store.path} lists no objects: nothing to score")
  return objects, styles


# --------------------------------------------------------------------------
# The reduction over the store


def map_mean_codes(params: sae_lib.Params, x: jax.Array, k: int) -> jax.Array:
  """Per-token TopK codes averaged over each map's tokens: x (B, T, d_in) -> (B, n_latents).

  Equal to ``mean(sae.encode(params, x, k), axis=1)``; the k active values of
  each token are scatter-added into (B, n_latents) so that no dense
  (B, T, n_latents) code array is built besides the pre-TopK latents.
  """
  values, indices = sae_lib.encode_sparse(params, x, k)  # (B, T, k)
  b, t = x.shape[:2]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], indices.shape)
  sums = jnp.zeros((b, params["W_enc"].shape[1]), values.dtype).at[rows, indices].add(values)
  return sums / t


def init_sums(n_objects: int, n_styles: int, n_steps: int, n_latents: int) -> dict[str, jax.Array]:
  """Zero accumulators: sums (C, S, L) and map counts (C, S) per domain."""
  z = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
  return {"object_sums": z(n_objects, n_steps, n_latents), "object_counts": z(n_objects, n_steps),
          "style_sums": z(n_styles, n_steps, n_latents), "style_counts": z(n_styles, n_steps)}


@functools.partial(jax.jit, static_argnames=("k", "n_objects", "n_styles", "n_steps"), donate_argnames=("acc",))
def accumulate(acc: dict[str, jax.Array], params: sae_lib.Params, x: jax.Array, object_ids: jax.Array,
               style_ids: jax.Array, step_ids: jax.Array, *, k: int, n_objects: int, n_styles: int,
               n_steps: int) -> dict[str, jax.Array]:
  """Adds one batch of maps x (B, T, d_in) to the per-(concept, step) sums.

  Ids outside [0, n) are ignored: style -1 (anchor prompts) and padding rows
  (object, style and step -1) add nothing.
  """
  m = map_mean_codes(params, x.astype(jnp.float32), k)
  so, co = imp.concept_sums(m, object_ids, step_ids, n_objects, n_steps)
  out = {"object_sums": acc["object_sums"] + so, "object_counts": acc["object_counts"] + co,
         "style_sums": acc["style_sums"], "style_counts": acc["style_counts"]}
  if n_styles:  # static: segment_sum needs at least one segment
    ss, cs = imp.concept_sums(m, style_ids, step_ids, n_styles, n_steps)
    out["style_sums"] = acc["style_sums"] + ss
    out["style_counts"] = acc["style_counts"] + cs
  return out


def _pad(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
  if len(a) == n:
    return a
  pad = np.full((n - len(a),) + a.shape[1:], fill, a.dtype)
  return np.concatenate([a, pad])


def reduce_store(params: sae_lib.Params, k: int, store: store_lib.Store, *, n_objects: int, n_styles: int,
                 batch_size: int = 256, split: str = "all", val_fraction: float = 0.0, split_seed: int = 0,
                 progress: bool = True) -> dict[str, np.ndarray]:
  """Per-(concept, step) sums and counts of map-mean TopK codes over the store.

  Every selected map is read once, in store order; batches have a fixed
  shape (the last one padded with ignored rows), so ``accumulate`` compiles
  once. Returns numpy arrays: object_sums (n_obj, S, L), object_counts
  (n_obj, S), style_sums, style_counts, timesteps (S,) int (-1: no map at
  that step), n_maps.
  """
  n_steps = int(store.manifest["identity"]["num_steps"])
  reader_kw = dict(seed=0, split=split, val_fraction=val_fraction, split_seed=split_seed, shuffle=False,
                   drop_remainder=False, num_epochs=1, dtype=None, process_index=0, process_count=1)
  probe = store_lib.MapBatches(store, 1, **reader_kw)
  labels = probe.labels[probe.rows]
  fields = list(store.label_fields)
  missing = [f for f in ("object", "style", "step", "timestep") if f not in fields]
  if missing:
    raise ScoresError(f"the store at {store.path} has no label fields {missing} (it has {fields})")
  col = {f: labels[:, fields.index(f)] for f in fields}
  for name, lo, hi in (("object", 0, n_objects), ("style", -1, n_styles), ("step", 0, n_steps)):
    bad = (col[name] < lo) | (col[name] >= hi)
    if bad.any():
      raise ScoresError(f"the store at {store.path} has {int(bad.sum())} maps with a {name} label outside "
                        f"[{lo}, {hi}) (e.g. {int(col[name][bad][0])}); its manifest does not describe "
                        "its labels. Collect it again.")
  timesteps = np.full((n_steps,), -1, np.int64)
  for s in range(n_steps):
    ts = np.unique(col["timestep"][col["step"] == s])
    if len(ts) > 1:
      raise ScoresError(f"step {s} of the store at {store.path} has several timesteps {ts.tolist()}: "
                        "the maps come from different schedules; collect them into separate stores")
    if len(ts):
      timesteps[s] = int(ts[0])

  n_rows = len(probe.rows)
  b = min(batch_size, n_rows)  # no point padding a small store up to a large batch
  reader = store_lib.MapBatches(store, b, **reader_kw)
  n_latents = int(params["W_enc"].shape[1])
  dev_params = jax.device_put(params)
  acc = init_sums(n_objects, n_styles, n_steps, n_latents)
  kw = dict(k=k, n_objects=n_objects, n_styles=n_styles, n_steps=n_steps)
  seen = 0
  for x, lab in tqdm(reader, total=reader.batches_per_epoch(), desc="scores", unit="batch",
                     disable=not progress):
    seen += len(x)
    ids = [_pad(np.asarray(lab[f], np.int32), b, -1) for f in ("object", "style", "step")]
    acc = accumulate(acc, dev_params, _pad(x, b, 0), *ids, **kw)
  out = {key: np.asarray(v) for key, v in jax.device_get(acc).items()}
  if seen != n_rows or int(out["object_counts"].sum()) != n_rows:
    raise ScoresError(f"read {seen} maps and counted {int(out['object_counts'].sum())}, expected {n_rows}: "
                      "the store reader and the labels disagree")
  out["timesteps"] = timesteps
  out["n_maps"] = np.int64(n_rows)
  return out


def importance_tables(sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """mu, importance scores and clamp thresholds of both domains from ``reduce_store``'s sums.

  Returns float32 arrays: mu_objects / scores_objects (n_obj, S, L),
  threshold_objects (S, L), counts_objects (n_obj, S), and the same for styles
  (a domain with no concept gets zero-size mu/scores and zero thresholds).
  """
  out = {}
  for dom, key in (("objects", "object"), ("styles", "style")):
    s, c = jnp.asarray(sums[f"{key}_sums"]), jnp.asarray(sums[f"{key}_counts"])
    mu = s / jnp.maximum(c, 1.0)[..., None]
    if mu.shape[0]:
      scores, threshold = imp.importance_scores(mu, c), imp.clamp_threshold(mu)
    else:
      scores, threshold = mu, jnp.zeros(mu.shape[1:], jnp.float32)
    out.update({f"mu_{dom}": mu, f"scores_{dom}": scores, f"threshold_{dom}": threshold, f"counts_{dom}": c})
  return {key: np.asarray(v, np.float32) for key, v in out.items()}


# --------------------------------------------------------------------------
# The stage


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def run(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Computes and writes scores, assignment, report (see the module docstring).

  Returns {"out_dir", "scores", "assignment", "report_json", "report_png",
  "manifest", "report", "assignment_ids", "n_maps", "wall_s"}; with a block per
  domain (config.style_block), {block: that} for each block's SAE.
  """
  if blocks.per_block(config):
    return {b: run(blocks.block_config(config, b), progress) for b in blocks.blocks(config)}
  t0 = time.perf_counter()
  s = settings(config)
  sae_dir, out_dir = s["sae_dir"], s["out_dir"]
  params, cfg, meta = load_sae(sae_dir)
  st = store_lib.open_store(s["store_path"])
  check_sae_fits_store(sae_dir, cfg, meta, st)
  objects, styles = _concept_names(st, meta, config)  # before begin: a refused run leaves no fingerprint.json
  fp = runs.make(config, ("scores",), ("scores.out_dir", "scores.sae_dir", "scores.batch_size"),
                 {"sae": runs.sae_hash(sae_dir), **runs.store_identity(st.manifest, len(store_lib.done_units(st)))},
                 stage="scores")
  runs.begin(out_dir, fp, overwrite=runs.overwrite(config), fresh="--config.scores.out_dir=<new folder>",
             write=jax.process_index() == 0)
  k, n_latents = int(cfg["k"]), int(cfg["num_latents"])
  mode = (meta or {}).get("mode", "unsupervised")
  sae_assignment = (meta or {}).get("assignment")
  if mode == "supervised" and sae_assignment is None:
    print(f"warning: {os.path.join(sae_dir, META_FILE)} says mode 'supervised' but has no assignment; "
          "the report shows no assigned-latent columns")
  if mode != "supervised":
    sae_assignment = None

  sums = reduce_store(params, k, st, n_objects=len(objects), n_styles=len(styles),
                      batch_size=int(s["batch_size"]), split=s["split"], val_fraction=float(s["val_fraction"]),
                      split_seed=int(s["split_seed"]), progress=progress)
  tables = importance_tables(sums)
  empty = [name for dom, names in (("objects", objects), ("styles", styles))
           for name, c in zip(names, tables[f"counts_{dom}"].sum(axis=1)) if c == 0]
  if empty:
    print(f"warning: no maps for concepts {empty}; their mu is 0 and their scores only say 'not this'")
  greedy = supervised.greedy_assignment(tables["scores_objects"], tables["scores_styles"])
  report = association_report(tables["scores_objects"], tables["scores_styles"], objects, styles,
                              assignment=sae_assignment, mass_fraction=float(s["mass_fraction"]))
  report.update(sae_dir=sae_dir, mode=mode, store_path=st.path)
  short = os.path.join(*sae_dir.split(os.sep)[-3:])  # e.g. canvas_mini/sae_sup/export
  title = f"SAE {short} ({mode}, k={k}, {n_latents} latents), {int(sums['n_maps'])} maps"

  paths = {name: os.path.join(out_dir, f) for name, f in (
      ("scores", SCORES_FILE), ("assignment", ASSIGNMENT_FILE), ("report_json", REPORT_FILE),
      ("report_png", PLOT_FILE), ("manifest", MANIFEST_FILE))}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(paths["manifest"]):
      os.unlink(paths["manifest"])  # the folder is incomplete until the new manifest is written
    atomic_write_bytes(paths["scores"], _npz_bytes({
        **tables, "timesteps": sums["timesteps"], "assignment": greedy,
        "objects": np.array(objects, dtype=str), "styles": np.array(styles, dtype=str)}))
    atomic_write_json(paths["assignment"], {
        "objects": {name: int(a) for name, a in zip(objects, greedy[:len(objects)])},
        "styles": {name: int(a) for name, a in zip(styles, greedy[len(objects):])},
        "object_names": objects, "style_names": styles,
        "latents": greedy.tolist(), "n_objects": len(objects), "n_latents": n_latents,
        "method": "greedy: objects then styles, each concept in decreasing order of its best "
                  "step-mean score takes its best free latent (supervised.greedy_assignment)",
        "sae_dir": sae_dir, "scores": paths["scores"]})
    atomic_write_json(paths["report_json"], report)
    plot_report(report, paths["report_png"], title=title)
    atomic_write_json(paths["manifest"], {
        "format": FORMAT, "version": VERSION,
        "sae": {"dir": sae_dir, "safetensors_sha256": hash_files([os.path.join(sae_dir, sparsify_io.WEIGHTS_FILE)]),
                "cfg": cfg, "saemnesia": meta},
        "store": {"path": st.path, "identity": st.manifest["identity"], "layout": st.layout},
        "config": config.to_dict(), "settings": s,
        "n_maps": int(sums["n_maps"]), "n_objects": len(objects), "n_styles": len(styles),
        "n_steps": int(len(sums["timesteps"])), "n_latents": n_latents, "k": k,
        "aggregation": AGGREGATION, "files": {name: os.path.basename(p) for name, p in paths.items()},
        "wall_s": time.perf_counter() - t0})
  print(format_report(report, title=title))
  print(f"wrote {out_dir}: {', '.join(os.path.basename(p) for p in paths.values())}")
  return {**paths, "out_dir": out_dir, "report": report, "assignment_ids": greedy,
          "n_maps": int(sums["n_maps"]), "wall_s": time.perf_counter() - t0}


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call: the scores folder (per block with config.style_block)."""
  del judge
  out = run(config, progress=progress)
  return out["out_dir"] if "out_dir" in out else {b: r["out_dir"] for b, r in out.items()}
