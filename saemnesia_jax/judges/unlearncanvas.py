"""The UnlearnCanvas judge: its two ViT-L classifiers (style, object), loaded
from timm checkpoints, behind the evaluation's judge interface. The class
names and the maps onto a config's concepts are in ``evaluation/unlearncanvas.py``."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saemnesia_jax.evaluation.unlearncanvas import (NO_STYLE_CLASS, OBJECT_CLASSES, STYLE_CLASSES, class_map,
                                                    find_classifier)
from saemnesia_jax.judges import vit
from saemnesia_jax.runtime.io_utils import hash_files


class ViTJudge:
  """``predict(images (N, H, W, 3) in [0, 1]) -> (object ids, style ids)`` from
  two timm ViT classifiers; ids are the config's concept ids (style
  ``concepts.NO_STYLE`` for the no-style class)."""

  def __init__(self, object_file: str, style_file: str, objects: Sequence[str], styles: Sequence[str],
               object_classes: Sequence[str] = OBJECT_CLASSES, style_classes: Sequence[str] = STYLE_CLASSES,
               no_style_class: str = NO_STYLE_CLASS, batch_size: int = 32, dtype: str = "float32",
               num_heads: int = 0):
    self._heads = jax.jit(self._heads_fn, static_argnums=(0,))
    self.batch_size = batch_size
    self.models = {}
    for task, file, classes in (("object", object_file, object_classes), ("style", style_file, style_classes)):
      model, params = vit.vit_from_timm(file, num_heads=num_heads, dtype=dtype)
      if model.config.num_labels != len(classes):
        raise ValueError(f"{file}: the head has {model.config.num_labels} classes but {len(classes)} class "
                         f"names were given for the {task} classifier")
      self.models[task] = (model, params)
    self.object_map = class_map(object_classes, objects, "object")
    self.style_map = class_map(style_classes, styles, "style", no_style=no_style_class)

  def _heads_fn(self, task: str, params, images):
    model, _ = self.models[task]
    size = model.config.image_size
    x = jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)
    x = (x - 0.5) / 0.5  # torchvision Normalize([0.5], [0.5]) after ToTensor
    feats, logits = vit.vit_features_and_logits(model, params, jnp.transpose(x, (0, 3, 1, 2)))
    return jnp.argmax(logits, -1), jnp.max(jax.nn.softmax(logits.astype(jnp.float32), -1), -1), feats

  def assess(self, images) -> dict[str, np.ndarray]:
    """Ids as ``predict``, plus ``object_conf``/``style_conf`` (softmax
    probability of the predicted class) and ``features`` (both ViTs' class
    tokens side by side) for the evaluation's quality measures."""
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
  files = find_classifier(d, "object"), find_classifier(d, "style")
  judge = ViTJudge(*files, config.concepts.objects, config.concepts.styles)
  judge.identity = "unlearncanvas:" + hash_files(list(files))[:16]  # the run fingerprint's record
  return judge
