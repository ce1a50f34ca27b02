"""The UnlearnCanvas judges: its ViT-L/16 style and object classifiers, run in JAX.

UnlearnCanvas (docs/method.md section 6) scores images with two fine-tuned timm
``vit_large_patch16_224`` classifiers saved as PyTorch checkpoints:

  {classifier_dir}/style_classifier.pth   51 classes: the 50 styles and Seed_Images
  {classifier_dir}/object_classifier.pth  20 classes

each a dict with the state dict under ``model_state_dict``, the classes in the
alphabetical order of their names (``STYLE_CLASSES`` / ``OBJECT_CLASSES``),
and inputs resized to 224 x 224 and scaled to [-1, 1]. ``models.vit_from_timm``
maps the weights onto transformers' Flax ViT, so judging runs jitted beside the
sampler; torch is needed only to read the ``.pth`` files (``.safetensors``
exports of the same state dicts load without it).

    python -m saemnesia_jax.evaluate --config configs/sd15.py \\
        --config.model.path=/data/sd15-unlearncanvas --config.evaluate.classifier_dir=/data/uc_classifiers
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from saemnesia_jax.evaluation import concepts
from saemnesia_jax.runtime.io_utils import hash_files

NO_STYLE_CLASS = "Seed_Images"
STYLE_CLASSES = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust",
    "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe",
    "Van_Gogh", "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter")
STYLES = tuple(s for s in STYLE_CLASSES if s != NO_STYLE_CLASS)
OBJECT_CLASSES = (
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
    "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls")
FILES = {"style": ("style_classifier.pth", "style_classifier.safetensors"),
         "object": ("object_classifier.pth", "object_classifier.safetensors")}


def _find(classifier_dir: str, task: str) -> str:
  for name in FILES[task]:
    path = os.path.join(classifier_dir, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"no {task} classifier in {classifier_dir!r}: expected one of {list(FILES[task])} (the UnlearnCanvas "
      "checkpoints; set config.evaluate.classifier_dir to their folder)")


def class_map(class_names: Sequence[str], names: Sequence[str], kind: str, no_style: str | None = None) -> np.ndarray:
  """For each classifier class, the config's concept id (``concepts.NO_STYLE`` for
  ``no_style``, and -2 for a class the config does not evaluate)."""
  out = []
  known = {n.lower(): i for i, n in enumerate(names)}
  for c in class_names:
    if no_style is not None and c == no_style:
      out.append(concepts.NO_STYLE)
    else:
      out.append(known.get(c.lower(), -2))
  missing = sorted(set(n.lower() for n in names) - set(c.lower() for c in class_names))
  if missing:
    raise KeyError(f"the {kind} classifier has no class for {missing}; its classes: {list(class_names)}")
  return np.asarray(out, np.int32)


class ViTJudge:
  """``predict(images (N, H, W, 3) in [0, 1]) -> (object ids, style ids)`` from
  two timm ViT classifiers; ids are the config's concept ids (style
  ``concepts.NO_STYLE`` for the no-style class)."""

  def __init__(self, object_file: str, style_file: str, objects: Sequence[str], styles: Sequence[str],
               object_classes: Sequence[str] = OBJECT_CLASSES, style_classes: Sequence[str] = STYLE_CLASSES,
               no_style_class: str = NO_STYLE_CLASS, batch_size: int = 32, dtype: str = "float32",
               num_heads: int = 0):
    import jax  # JAX, diffusers, transformers: only when judging (configs import the names above)
    from saemnesia_jax.diffusion import models
    self._heads = jax.jit(self._heads_fn, static_argnums=(0,))
    self.batch_size = batch_size
    self.models = {}
    for task, file, classes in (("object", object_file, object_classes), ("style", style_file, style_classes)):
      model, params = models.vit_from_timm(file, num_heads=num_heads, dtype=dtype)
      if model.config.num_labels != len(classes):
        raise ValueError(f"{file}: the head has {model.config.num_labels} classes but {len(classes)} class "
                         f"names were given for the {task} classifier")
      self.models[task] = (model, params)
    self.object_map = class_map(object_classes, objects, "object")
    self.style_map = class_map(style_classes, styles, "style", no_style=no_style_class)

  def _heads_fn(self, task: str, params, images):
    import jax
    import jax.numpy as jnp
    from saemnesia_jax.diffusion import models
    model, _ = self.models[task]
    size = model.config.image_size
    x = jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)
    x = (x - 0.5) / 0.5  # torchvision Normalize([0.5], [0.5]) after ToTensor
    feats, logits = models.vit_features_and_logits(model, params, jnp.transpose(x, (0, 3, 1, 2)))
    return jnp.argmax(logits, -1), jnp.max(jax.nn.softmax(logits.astype(jnp.float32), -1), -1), feats

  def assess(self, images) -> dict[str, np.ndarray]:
    """Ids as ``predict``, plus ``object_conf``/``style_conf`` (softmax
    probability of the predicted class) and ``features`` (both ViTs' class
    tokens side by side) for the evaluation's quality measures."""
    import jax
    import jax.numpy as jnp
    images = np.asarray(images, np.float32)
    out = {t: ([], [], []) for t in ("object", "style")}
    bs = max(1, min(self.batch_size, len(images)))  # a small answer set is not padded to a full batch
    for i in range(0, len(images), bs):
      chunk = images[i:i + bs]
      n = len(chunk)
      if n < bs:  # one compiled size
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - n, 0)])
      for task, acc in out.items():
        for a, r in zip(acc, jax.device_get(self._heads(task, self.models[task][1], jnp.asarray(chunk)))):
          a.append(np.asarray(r)[:n])
    cat = {t: [np.concatenate(a) if a else np.zeros(0) for a in acc] for t, acc in out.items()}
    obj = cat["object"][0].astype(np.int64)
    sty = cat["style"][0].astype(np.int64)
    feats = [cat[t][2].reshape(len(images), -1) for t in ("object", "style")]
    return {"object": self.object_map[obj], "style": self.style_map[sty],
            "object_conf": cat["object"][1].astype(np.float32), "style_conf": cat["style"][1].astype(np.float32),
            "features": np.concatenate(feats, -1).astype(np.float32)}

  def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
    a = self.assess(images)
    return a["object"], a["style"]


def unlearncanvas_judge(config) -> ViTJudge:
  """The judge of ``config.evaluate.classifier == 'unlearncanvas'``."""
  d = config.evaluate.classifier_dir
  if not d:
    raise ValueError("config.evaluate.classifier='unlearncanvas' needs config.evaluate.classifier_dir: "
                     "the folder with style_classifier.pth and object_classifier.pth")
  files = _find(d, "object"), _find(d, "style")
  judge = ViTJudge(*files, config.concepts.objects, config.concepts.styles)
  judge.identity = "unlearncanvas:" + hash_files(list(files))[:16]  # the run fingerprint's record
  return judge
