"""Does the hooked block carry the concepts? A linear probe on map-mean activations.

SAEmnesia supervises each assigned latent's *map mean* (docs/method.md section 3)
and SAeUron's importance scores are map means of TopK codes (section 4): both
presuppose that a concept moves the map-averaged activation of the hooked
block along some direction. This stage measures that premise on a collected
store before any SAE is trained: the held-out accuracy of a softmax
regression from a map's mean activation (d_in numbers) to its object and to
its style. A probe near chance says no map-mean latent of any SAE on this
block can single the concept out; pick a block where the probe is high.

  python -m saemnesia_jax.collect --config configs/canvas_mini.py --config.block=up_blocks.1.attentions.0 \\
      --config.workdir=runs/probe_up10
  python -m saemnesia_jax.probe   --config configs/canvas_mini.py --config.block=up_blocks.1.attentions.0 \\
      --config.workdir=runs/probe_up10

Settings (``config.probe``): steps, batch_size (maps), learning_rate (Adam),
val_fraction / split_seed (the held-out maps: split by (prompt, seed) with the
store reader's hash, so no image is on both sides), seed, out_dir ('' ->
{workdir}/probe). Writes probe.json: per domain the number of classes,
chance (the majority class's share of the held-out maps), the held-out
accuracy overall and per sampling step.
"""
from __future__ import annotations

if __name__ == "__main__":  # flags, help and checks before the heavy imports
  from saemnesia_jax.runtime import cli
  cli.main("probe")

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from saemnesia_jax import store as store_lib
from saemnesia_jax.diffusion import blocks
from saemnesia_jax.runtime import io_utils, layout, runs
from saemnesia_jax.runtime.errors import UserError


class ProbeError(UserError):
  """The store or the settings of the probe stage do not fit together."""


def map_means(store: store_lib.Store, batch_size: int = 256, progress: bool = True
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Every stored map's mean over its tokens, streamed: ((n_maps, d_in) float32, labels field -> (n_maps,)).

  Only d_in numbers per map stay in memory, so SD-sized stores fit too.
  """
  # The reader refuses an incomplete store, so every one of its n_maps is read.
  reader = store_lib.MapBatches(store, min(batch_size, store.n_maps), seed=0, split="all", shuffle=False,
                                drop_remainder=False, num_epochs=1, dtype=None, process_index=0,
                                process_count=1)
  means, labels = [], {f: [] for f in store.label_fields}
  for x, lab in tqdm(reader, total=reader.batches_per_epoch(), desc="map means", unit="batch",
                     disable=not progress):
    means.append(np.asarray(x, np.float32).mean(axis=1))
    for f in store.label_fields:
      labels[f].append(np.asarray(lab[f]))
  return np.concatenate(means), {f: np.concatenate(v) for f, v in labels.items()}


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int = 1500, batch_size: int = 256,
              learning_rate: float = 3e-3, seed: int = 0) -> dict[str, jax.Array]:
  """Softmax regression on standardised features; rows with y < 0 are ignored.

  Returns {"W" (d, C), "b" (C,), "mean" (d,), "scale" (d,)}; ``predict`` applies it.
  """
  keep = y >= 0
  x, y = np.asarray(x[keep], np.float32), np.asarray(y[keep], np.int32)
  if len(x) == 0:
    raise ProbeError("fit_probe: no labelled rows to fit")
  mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6  # activations span orders of magnitude per channel
  xs = jnp.asarray((x - mean) / scale)
  params = {"W": jnp.zeros((x.shape[1], n_classes)), "b": jnp.zeros((n_classes,))}
  opt = optax.adam(learning_rate)

  # The data are arguments, not closed over: a closure would bake them into the program as constants.
  @jax.jit
  def step(params, opt_state, xs, ys, idx):
    def loss(p):
      logits = xs[idx] @ p["W"] + p["b"]
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ys[idx]))
    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = opt.init(params)
  ys = jnp.asarray(y)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = jnp.asarray(rng.integers(0, len(x), min(batch_size, len(x))))
    params, opt_state = step(params, opt_state, xs, ys, idx)
  return {**params, "mean": jnp.asarray(mean), "scale": jnp.asarray(scale)}


def predict(probe: dict[str, jax.Array], x: np.ndarray) -> np.ndarray:
  z = (jnp.asarray(x, jnp.float32) - probe["mean"]) / probe["scale"]
  return np.asarray(jnp.argmax(z @ probe["W"] + probe["b"], axis=-1))


def _split(y: np.ndarray, is_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Training and held-out maps of one domain (maps with y < 0 are left out)."""
  train, val = (~is_val) & (y >= 0), is_val & (y >= 0)
  if not train.any() or not val.any():
    raise ProbeError(f"the split leaves {int(train.sum())} training and {int(val.sum())} held-out maps; "
                     "both must be non-empty (raise probe.val_fraction or collect more seeds)")
  return train, val


def check_split(st: store_lib.Store, val_fraction: float, split_seed: int) -> None:
  """``probe_domain``'s split check from the labels alone (no maps read)."""
  labels, mask = store_lib.read_labels(st)
  col = {f: labels[mask][:, i] for i, f in enumerate(st.label_fields)}
  is_val = store_lib.split_hash(np.stack([col["prompt"], col["seed"]], axis=1), split_seed) < val_fraction
  grid = st.manifest["identity"].get("prompt_grid", {})
  for field, key in (("object", "objects"), ("style", "styles")):
    if field in col and grid.get(key):
      _split(col[field], is_val)


def probe_domain(means: np.ndarray, y: np.ndarray, steps_of_maps: np.ndarray, is_val: np.ndarray,
                 n_classes: int, **fit_kw: Any) -> dict[str, Any]:
  """Fits on the training maps and scores the held-out ones (maps with y < 0 are left out)."""
  train, val = _split(y, is_val)
  probe = fit_probe(means[train], y[train], n_classes, **fit_kw)
  hit = predict(probe, means[val]) == y[val]
  counts = np.bincount(y[val], minlength=n_classes)
  per_step = {int(s): float(hit[steps_of_maps[val] == s].mean()) for s in np.unique(steps_of_maps[val])}
  return {"n_classes": int(n_classes), "n_train": int(train.sum()), "n_val": int(val.sum()),
          "chance": float(counts.max() / counts.sum()), "accuracy": float(hit.mean()),
          "worst_step_accuracy": float(min(per_step.values())), "per_step": per_step}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  if blocks.per_block(config):  # each block's store
    return {b: run(blocks.block_config(config, b)) for b in blocks.blocks(config)}
  p = config.probe
  path = layout.store_path(config)
  st = store_lib.open_store(path)
  if st.manifest["identity"].get("block") != config.block:
    raise ProbeError(f"the store at {path} holds {st.manifest['identity'].get('block')!r}, the config asks for "
                     f"{config.block!r}: collect this block first (python -m saemnesia_jax.collect with the "
                     "same --config.block and --config.workdir)")
  missing = [f for f in ("prompt", "seed", "step") if f not in st.label_fields]
  if missing:  # before begin: a refused run leaves no fingerprint.json
    raise ProbeError(f"the store at {path} has no label fields {missing} (it has {list(st.label_fields)}): "
                     "collect it again with this version")
  check_split(st, p.val_fraction, p.split_seed)  # likewise
  out_dir = layout.probe_dir(config)
  fp = runs.make(config, ("block", "probe"), ("probe.out_dir",),
                 runs.store_identity(st.manifest, len(store_lib.done_units(st))), stage="probe")
  runs.begin(out_dir, fp, overwrite=runs.overwrite(config), fresh="--config.probe.out_dir=<new folder>")
  grid = st.manifest["identity"].get("prompt_grid", {})
  names = {"object": list(grid.get("objects", [])), "style": list(grid.get("styles", []))}
  means, labels = map_means(st)
  fields = st.label_fields
  keys = np.stack([labels[f] for f in ("prompt", "seed")], axis=1)
  is_val = store_lib.split_hash(keys, p.split_seed) < p.val_fraction
  report: dict[str, Any] = {"block": config.block, "store": os.path.abspath(path), "d_in": st.d_in,
                            "tokens_per_map": st.tokens_per_map, "n_maps": int(len(means)), "domains": {}}
  fit_kw = dict(steps=p.steps, batch_size=p.batch_size, learning_rate=p.learning_rate, seed=p.seed)
  for field in ("object", "style"):
    if field not in fields or not names[field]:
      continue
    report["domains"][field] = probe_domain(means, labels[field], labels["step"], is_val, len(names[field]),
                                            **fit_kw)
  io_utils.atomic_write_json(os.path.join(out_dir, "probe.json"), report)
  print(format_report(report))
  return report


def format_report(report: dict[str, Any]) -> str:
  lines = [f"linear probe on map-mean activations of {report['block']} "
           f"({report['n_maps']} maps, d_in {report['d_in']}, {report['tokens_per_map']} tokens per map)",
           f"{'domain':8s} {'classes':>7s} {'chance':>7s} {'held-out acc':>12s} {'worst step':>10s}"]
  for name, d in report["domains"].items():
    lines.append(f"{name:8s} {d['n_classes']:7d} {d['chance']:7.3f} {d['accuracy']:12.3f} "
                 f"{d['worst_step_accuracy']:10.3f}")
  return "\n".join(lines)


def pipeline_step(config: ml_collections.ConfigDict, *, judge: Any = None, progress: bool = True) -> Any:
  """The pipeline's call."""
  del judge, progress
  return run(config)
