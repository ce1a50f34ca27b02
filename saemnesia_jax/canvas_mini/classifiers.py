"""CanvasMini judges: an object classifier and a style classifier (Flax CNNs).

They play the part of UnlearnCanvas' ViT-L/16 classifiers (docs/method.md section
6): UA, IRA and CRA are computed from their predictions on generated images.
Both take float32 NHWC images in [0, 1] (16x16x3 by default); the object head
has ``data.N_OBJECTS`` classes, the style head ``data.N_STYLE_CLASSES`` (the
styles, then no-style ``data.NO_STYLE`` at ``data.NO_STYLE_ID``).

A second judge (``classifier.no_object_share`` > 0) adds a no-object class,
``data.NO_OBJECT`` at id ``data.N_OBJECTS``, to the object head, trained on
shapeless images (``data.no_object_images``: a style's background alone, noise).
The shipped object head has to name one of the ten objects even for noise, and
it calls noise and flat colours mostly Frame or Square; the no-object judge
can say that no object is there. It keeps the shipped style head unchanged, so
style readings agree between the two. Train and write it with

  python -m saemnesia_jax.canvas_mini.classifiers --config configs/canvas_mini.py \
    --config.classifier.no_object_share=0.2 --out_dir=saemnesia_jax/assets/canvas_mini/classifiers_no_object

Train both and write them (parameters as flax msgpack, a JSON report with the
config and held-out accuracies, and a PNG grid of the data):

  python -m saemnesia_jax.canvas_mini.classifiers --config configs/canvas_mini.py

Use them:

  clfs = load_classifiers()            # the shipped assets
  object_ids, style_ids = predict(clfs, images)
"""
from __future__ import annotations

import importlib.resources
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization, struct
from tqdm import tqdm

from saemnesia_jax.canvas_mini import data
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, atomic_write_json, hash_files, read_json

PARAMS_FILE = "classifiers.msgpack"
REPORT_FILE = "classifiers.json"
GRID_FILE = "grid.png"
MAIN_COMMAND = "python -m saemnesia_jax.canvas_mini.classifiers --config configs/canvas_mini.py"
HEADS = ("object", "style")


def default_path(no_object: bool = False) -> str:
  """The shipped asset folder, inside the installed package (with
  ``no_object``: the judge whose object head has the no-object class)."""
  name = "classifiers_no_object" if no_object else "classifiers"
  return str(importlib.resources.files("saemnesia_jax") / "assets" / "canvas_mini" / name)


class ConvNet(nn.Module):
  """Two 3x3 convs (ReLU) per resolution, 2x2 average pooling between, a linear head.

  The last feature map (image_size / 2**(len(widths)-1) px) is flattened, not
  pooled, so the head sees where things are (Tee vs Corner vs Plus).
  """
  widths: tuple[int, ...]
  n_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, features: bool = False):
    """Logits; with ``features``, (logits, the head's input: the flattened last feature map)."""
    x = 2.0 * x - 1.0
    for i, w in enumerate(self.widths):
      if i:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.relu(nn.Conv(w, (3, 3))(x))
    h = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.n_classes)(h)
    return (logits, h) if features else logits


def object_classes(no_object: bool) -> tuple[str, ...]:
  """The object head's classes: the objects, then ``data.NO_OBJECT`` if asked."""
  return data.OBJECTS + ((data.NO_OBJECT,) if no_object else ())


def _nets(widths: tuple[int, ...], n_object_classes: int = data.N_OBJECTS) -> dict[str, ConvNet]:
  return {"object": ConvNet(tuple(widths), n_object_classes),
          "style": ConvNet(tuple(widths), data.N_STYLE_CLASSES)}


@struct.dataclass
class Classifiers:
  """Both heads' parameters (a pytree) plus the static architecture."""
  params: dict[str, Any]  # {"object": flax params, "style": flax params}
  widths: tuple[int, ...] = struct.field(pytree_node=False)
  image_size: int = struct.field(pytree_node=False)
  # data.OBJECTS, or data.OBJECTS + (data.NO_OBJECT,) for the no-object judge
  object_classes: tuple[str, ...] = struct.field(pytree_node=False, default=data.OBJECTS)

  @property
  def no_object(self) -> bool:
    return len(self.object_classes) > data.N_OBJECTS


def init_params(key: jax.Array, widths: tuple[int, ...], image_size: int,
                n_object_classes: int = data.N_OBJECTS) -> dict[str, Any]:
  """Fresh parameters for both heads: {"object": ..., "style": ...}."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  keys = jax.random.split(key, 2)
  return {h: net.init(k, x)["params"]
          for (h, net), k in zip(_nets(widths, n_object_classes).items(), keys)}


def _logits(params, widths, images, n_object_classes: int = data.N_OBJECTS, heads=HEADS):
  nets = _nets(widths, n_object_classes)
  return tuple(nets[h].apply({"params": params[h]}, images) for h in heads)


@jax.jit
def _classify(clfs: Classifiers, images: jax.Array):
  return _logits(clfs.params, clfs.widths, images, len(clfs.object_classes))


@jax.jit
def _assess(clfs: Classifiers, images: jax.Array):
  """Per head: (argmax, softmax confidence of it, penultimate features)."""
  nets, out = _nets(clfs.widths, len(clfs.object_classes)), []
  for h in HEADS:
    logits, feats = nets[h].apply({"params": clfs.params[h]}, images, features=True)
    out.append((jnp.argmax(logits, -1), jnp.max(jax.nn.softmax(logits, -1), -1), feats))
  return tuple(out)


def _check_images(clfs: Classifiers, images: Any) -> jax.Array:
  shape = tuple(np.shape(images))
  want = (clfs.image_size, clfs.image_size, 3)
  if len(shape) != 4 or shape[1:] != want:
    raise ValueError(f"images must be (batch, {want[0]}, {want[1]}, 3) float32 in [0, 1] (NHWC), "
                     f"got shape {shape}")
  return jnp.asarray(images, jnp.float32)


def classify(clfs: Classifiers, images: Any) -> tuple[jax.Array, jax.Array]:
  """(object_logits (B, len(clfs.object_classes)), style_logits (B, N_STYLE_CLASSES)) for NHWC
  images in [0, 1].

  Checks the shape, then calls one jitted function (compiled once per batch size).
  """
  return _classify(clfs, _check_images(clfs, images))


def predict(clfs: Classifiers, images: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(object_ids (B,), style_ids (B,)) as numpy int32; batches are padded to one compiled size."""
  a = assess(clfs, images, batch_size)
  return a["object"], a["style"]


def assess(clfs: Classifiers, images: Any, batch_size: int = 1024) -> dict[str, np.ndarray]:
  """What the evaluation's quality measures need: ``object``/``style`` ids (as
  ``predict``), ``object_conf``/``style_conf`` (softmax probability of the
  predicted class) and ``features`` (both heads' penultimate features side by
  side, (B, 2 x 512) at the shipped widths), as numpy."""
  images = np.asarray(images, np.float32)
  _check_images(clfs, images)
  n, parts = len(images), []
  bs = min(batch_size, max(n, 1))
  for i in range(0, n, bs):
    chunk = images[i:i + bs]
    pad = bs - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    (io, co, fo), (is_, cs, fs) = jax.device_get(_assess(clfs, jnp.asarray(chunk)))
    parts.append((io[:bs - pad], is_[:bs - pad], co[:bs - pad], cs[:bs - pad],
                  np.concatenate([fo, fs], -1)[:bs - pad]))
  cat = [np.concatenate(x) for x in zip(*parts)] if parts else [np.zeros(0)] * 5
  return {"object": cat[0].astype(np.int32), "style": cat[1].astype(np.int32),
          "object_conf": cat[2].astype(np.float32), "style_conf": cat[3].astype(np.float32),
          "features": cat[4].astype(np.float32)}


# ----------------------------------------------------------- corruptions


def blur3(x, xp=np):
  """3x3 binomial ([1, 2, 1] / 4 per axis) blur of NHWC images, edge-padded; numpy or jax.numpy."""
  p = xp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  x = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
  return 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]


def corrupt(images: np.ndarray, seed: int, noise: float, blur: float) -> np.ndarray:
  """Deterministic eval corruption: ``(1-blur)*x + blur*blur3(x)``, plus N(0, noise^2), clipped."""
  x = (1 - blur) * images + blur * blur3(images)
  x = x + np.random.default_rng(seed).normal(0, noise, x.shape)
  return np.clip(x, 0, 1).astype(np.float32)


def augment(key: jax.Array, images: jax.Array, noise_max: float, blur_max: float,
            brightness: float) -> jax.Array:
  """Training augmentation: per image a random blur mix, brightness shift and Gaussian noise."""
  kb, kc, ks, kn = jax.random.split(key, 4)
  b = images.shape[0]
  mix = jax.random.uniform(kb, (b, 1, 1, 1), maxval=blur_max)
  x = (1 - mix) * images + mix * blur3(images, jnp)
  x = x + jax.random.uniform(kc, (b, 1, 1, 1), minval=-brightness, maxval=brightness)
  sigma = jax.random.uniform(ks, (b, 1, 1, 1), maxval=noise_max)
  return jnp.clip(x + sigma * jax.random.normal(kn, x.shape), 0.0, 1.0)


# ---------------------------------------------------------------- training


def _check_config(config: ml_collections.ConfigDict) -> None:
  d = config.data
  for key, want in (("objects", data.OBJECTS), ("styles", data.STYLES)):
    if tuple(d[key]) != want:
      raise ValueError(f"config.data.{key} = {tuple(d[key])} must equal saemnesia_jax.canvas_mini.data."
                       f"{key.upper()} = {want} (concept ids are positions in these lists)")
  if d.no_style != data.NO_STYLE:
    raise ValueError(f"config.data.no_style = {d.no_style!r} must be {data.NO_STYLE!r}")
  seeds = {d.train_seed, d.eval_seed}
  if len(seeds) != 2:
    raise ValueError(f"data.eval_seed ({d.eval_seed}) must differ from data.train_seed ({d.train_seed})")
  c = config.classifier
  if not 0 < c.batch_size <= c.n_train:
    raise ValueError(f"classifier.batch_size ({c.batch_size}) must be in 1..n_train ({c.n_train})")
  if len(c.eval_noise) != len(c.eval_blur):
    raise ValueError(f"classifier.eval_noise {c.eval_noise} and eval_blur {c.eval_blur} must have one "
                     "entry per corruption level")
  share = c.get("no_object_share", 0.0)
  if not 0.0 <= share < 1.0:
    raise ValueError(f"classifier.no_object_share={share}: the share of no-object training images, in "
                     "[0, 1); 0 trains the shipped ten-object judge")


def _no_object_seed(seed: int) -> np.random.SeedSequence:
  # A child that data.sample's own two children never equal.
  return np.random.SeedSequence(seed).spawn(3)[2]


def _training_set(config, spec):
  """(images, object labels, style labels) of the training set; with a
  no-object share, shapeless images labelled ``data.N_OBJECTS`` are added
  (their style label is unused: only the object head trains then)."""
  c = config.classifier
  images, obj, sty = data.sample(c.n_train, config.data.train_seed, spec)
  share = c.get("no_object_share", 0.0)
  if share:
    n_none = int(round(c.n_train * share / (1 - share)))
    none, _ = data.no_object_images(n_none, _no_object_seed(config.data.train_seed), spec)
    images = np.concatenate([images, none])
    obj = np.concatenate([obj, np.full(n_none, data.N_OBJECTS, np.int32)])
    sty = np.concatenate([sty, np.full(n_none, -1, np.int32)])
  return images, obj, sty


def train(config: ml_collections.ConfigDict, progress: bool = True,
          style_head_dir: str | None = None) -> tuple[Classifiers, dict]:
  """Trains both heads on ``classifier.n_train`` images from ``data.train_seed``.

  With ``classifier.no_object_share`` > 0 only the object head trains, with
  the no-object class and that share of shapeless images; the style head is
  the one at ``style_head_dir`` (default: the shipped classifiers), unchanged.

  Returns the classifiers and a history {"step": [...], "loss": [...]} (loss =
  sum of the trained heads' mean cross-entropy, nats, logged every 50 steps and at the end).
  """
  _check_config(config)
  c, spec = config.classifier, data.RenderSpec.from_config(config.data)
  widths = tuple(c.widths)
  no_object = bool(c.get("no_object_share", 0.0))
  classes = object_classes(no_object)
  heads = ("object",) if no_object else HEADS
  images, obj, sty = _training_set(config, spec)
  n = len(images)

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, c.learning_rate, c.warmup_steps, max(c.steps, c.warmup_steps + 1), c.learning_rate * 0.01)
  tx = optax.adam(schedule)
  key = jax.random.key(c.init_seed)
  params = init_params(jax.random.fold_in(key, 0), widths, spec.image_size, len(classes))
  if no_object:
    base = load_classifiers(style_head_dir)
    if (base.widths, base.image_size) != (widths, spec.image_size):
      raise ValueError(f"the style head at {style_head_dir or default_path()} has widths {base.widths} at "
                       f"{base.image_size} px; this config trains {widths} at {spec.image_size} px")
    style_params = base.params["style"]
    params = {"object": params["object"]}
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, yo, ys, key):
    x = augment(key, x, c.aug_noise_max, c.aug_blur_max, c.aug_brightness)

    def loss_fn(p):
      logits = _logits(p, widths, x, len(classes), heads)
      return sum(optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
                 for lg, y in zip(logits, (yo, ys)))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(c.init_seed)
  order, pos = rng.permutation(n), 0
  history = {"step": [], "loss": []}
  aug_key = jax.random.fold_in(key, 1)
  bar = tqdm(range(c.steps), desc="classifiers", disable=not progress, mininterval=2.0)
  for i in bar:
    if pos + c.batch_size > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + c.batch_size]
    pos += c.batch_size
    params, opt_state, loss = step(params, opt_state, images[idx], obj[idx], sty[idx],
                                   jax.random.fold_in(aug_key, i))
    if i % 50 == 0 or i == c.steps - 1:
      history["step"].append(i)
      history["loss"].append(float(loss))
      bar.set_postfix(loss=f"{float(loss):.4f}")
  if no_object:
    params = {"object": params["object"], "style": style_params}
  return Classifiers(params, widths, spec.image_size, classes), history


def evaluate(clfs: Classifiers, images: np.ndarray, object_ids: np.ndarray,
             style_ids: np.ndarray) -> dict[str, Any]:
  """Accuracy (fraction) overall and per class, for both heads."""
  po, ps = predict(clfs, images)
  out = {}
  for head, pred, true, names in (("object", po, object_ids, data.OBJECTS),
                                  ("style", ps, style_ids, data.STYLE_CLASSES)):
    out[head] = {
        "accuracy": float(np.mean(pred == true)),
        "per_class": {n: float(np.mean(pred[true == k] == k)) if np.any(true == k) else None
                      for k, n in enumerate(names)},
        "n": int(len(true)),
    }
  return out


def evaluate_no_object(clfs: Classifiers, n: int, seed: int, spec: data.RenderSpec,
                       real_images: np.ndarray) -> dict[str, Any]:
  """The no-object class on held-out images: the share of ``n`` shapeless
  images (``data.no_object_images``) called ``data.NO_OBJECT``, overall and
  per kind, and the share of ``real_images`` (which all hold an object)
  called it (fractions)."""
  images, kind = data.no_object_images(n, _no_object_seed(seed), spec)
  po, _ = predict(clfs, images)
  hit = po == data.N_OBJECTS
  pr, _ = predict(clfs, real_images)
  return {"n": n, "called_no_object": float(np.mean(hit)),
          "per_kind": {name: float(np.mean(hit[kind == k])) if np.any(kind == k) else None
                       for k, name in enumerate(data.NO_OBJECT_KINDS)},
          "real_called_no_object": float(np.mean(pr == data.N_OBJECTS))}


# --------------------------------------------------------------- save / load


def _n_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def save_classifiers(clfs: Classifiers, out_dir: str, report: Mapping[str, Any]) -> str:
  """Writes ``classifiers.msgpack`` and ``classifiers.json`` (``report`` plus what loading needs)."""
  params_path = os.path.join(out_dir, PARAMS_FILE)
  atomic_write_bytes(params_path, serialization.to_bytes(jax.device_get(clfs.params)))
  meta = dict(report)
  meta.update({
      "params_file": PARAMS_FILE,
      "params_sha256": hash_files([params_path]),
      "n_params": {h: _n_params(clfs.params[h]) for h in HEADS},
      "widths": list(clfs.widths),
      "image_size": clfs.image_size,
      "objects": list(clfs.object_classes),
      "style_classes": list(data.STYLE_CLASSES),
      "no_style_id": data.NO_STYLE_ID,
      "generator_version": data.GENERATOR_VERSION,
  })
  atomic_write_json(os.path.join(out_dir, REPORT_FILE), meta)
  _make_readable(params_path, os.path.join(out_dir, REPORT_FILE))
  return out_dir


def _make_readable(*paths: str) -> None:
  # The atomic writes create 0600 temp files; shipped assets must be readable by every user.
  for p in paths:
    os.chmod(p, 0o644)


def _asset_error(path: str, problem: str) -> str:
  return f"CanvasMini classifiers at {path}: {problem}. Re-create them with `{MAIN_COMMAND}`."


def load_classifiers(path: str | None = None) -> Classifiers:
  """Loads the classifiers from a folder written by ``save_classifiers`` (default: shipped assets).

  Raises FileNotFoundError (missing files) or ValueError (unreadable, wrong
  shapes, or trained for another concept list / generator version), naming
  the path and the command that re-creates them.
  """
  path = default_path() if path is None else str(path)
  report_path, params_path = os.path.join(path, REPORT_FILE), os.path.join(path, PARAMS_FILE)
  for p in (report_path, params_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(_asset_error(path, f"missing file {p}"))
  try:
    meta = read_json(report_path)
    widths, size = tuple(int(w) for w in meta["widths"]), int(meta["image_size"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(_asset_error(path, f"unreadable {REPORT_FILE} ({type(e).__name__}: {e})")) from e
  classes = tuple(meta.get("objects", ()))
  if (classes not in (object_classes(False), object_classes(True))
      or tuple(meta.get("style_classes", ())) != data.STYLE_CLASSES):
    raise ValueError(_asset_error(path, "trained for another concept list "
                                  f"({meta.get('objects')}, {meta.get('style_classes')})"))
  if meta.get("generator_version") != data.GENERATOR_VERSION:
    raise ValueError(_asset_error(path, f"trained on generator version {meta.get('generator_version')}, "
                                  f"this code draws version {data.GENERATOR_VERSION}"))
  target = jax.eval_shape(lambda: init_params(jax.random.key(0), widths, size, len(classes)))
  try:
    with open(params_path, "rb") as f:
      raw = serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several unrelated types on bad bytes
    raise ValueError(_asset_error(path, f"unreadable {PARAMS_FILE} ({type(e).__name__}: {e})")) from e
  want = jax.tree.map(lambda s: tuple(s.shape), target)
  try:
    got = jax.tree.map(lambda a: tuple(np.shape(a)), raw)
  except Exception:  # noqa: BLE001
    got = None
  if got != want:
    raise ValueError(_asset_error(path, f"{PARAMS_FILE} does not match widths {widths} at "
                                  f"{size}x{size} px"))
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), raw)
  return Classifiers(params, widths, size, classes)


# -------------------------------------------------------------------- main


def train_and_save(config: ml_collections.ConfigDict, out_dir: str, progress: bool = True) -> dict:
  """Trains both heads, evaluates them on fresh images (clean and corrupted), writes the assets."""
  _check_config(config)
  c, spec = config.classifier, data.RenderSpec.from_config(config.data)
  t0 = time.time()
  clfs, history = train(config, progress=progress)
  train_s = time.time() - t0
  images, obj, sty = data.sample(c.n_eval, config.data.eval_seed, spec)
  clean = evaluate(clfs, images, obj, sty)
  corrupted = [{"noise_sigma": nz, "blur_mix": bl,
                **evaluate(clfs, corrupt(images, config.data.eval_seed, nz, bl), obj, sty)}
               for nz, bl in zip(c.eval_noise, c.eval_blur)]
  report = {
      "config": config.to_dict(),
      "eval": {"seed": config.data.eval_seed, "n": c.n_eval, "clean": clean, "corrupted": corrupted},
      "train": {"seconds": round(train_s, 1), "history": history},
  }
  if clfs.no_object:
    report["eval"]["no_object"] = evaluate_no_object(clfs, c.n_eval // 4, config.data.eval_seed, spec, images)
  save_classifiers(clfs, out_dir, report)
  atomic_write_bytes(os.path.join(out_dir, GRID_FILE),
                     data.grid_png(data.grid(config.data.grid_seed, spec)))
  _make_readable(os.path.join(out_dir, GRID_FILE))
  return report


def main(argv):
  del argv
  from absl import flags  # deferred
  cfg = flags.FLAGS.config
  out_dir = flags.FLAGS.out_dir or default_path()
  report = train_and_save(cfg, out_dir)
  rows = [("clean", report["eval"]["clean"])] + [
      (f"noise {r['noise_sigma']} blur {r['blur_mix']}", r) for r in report["eval"]["corrupted"]]
  for name, r in rows:
    print(f"{name:22s} object accuracy {100 * r['object']['accuracy']:.2f}%  "
          f"style accuracy {100 * r['style']['accuracy']:.2f}%  (n={r['object']['n']})")
  if "no_object" in report["eval"]:
    r = report["eval"]["no_object"]
    kinds = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["per_kind"].items() if v is not None)
    print(f"shapeless images called {data.NO_OBJECT}: {100 * r['called_no_object']:.2f}% (n={r['n']}: {kinds}); "
          f"images with an object called it: {100 * r['real_called_no_object']:.2f}%")
  print(f"trained in {report['train']['seconds']} s; wrote {out_dir}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/canvas_mini.py", lock_config=True)
  flags.DEFINE_string("out_dir", None, "output folder (default: the package's shipped assets)")
  flags.mark_flags_as_required(["config"])
  app.run(main)
