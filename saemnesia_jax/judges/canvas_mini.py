"""The CanvasMini judge: the miniature benchmark's object and style classifiers
behind the evaluation's judge interface."""
from __future__ import annotations

import os

import numpy as np

from saemnesia_jax.canvas_mini import classifiers, data
from saemnesia_jax.evaluation import concepts
from saemnesia_jax.runtime.io_utils import hash_files


class CanvasMiniJudge:
  """The CanvasMini classifiers behind the evaluation's interface.

  ``predict(images (N, H, W, 3) in [0, 1]) -> (object ids, style ids)`` with
  style -1 (``concepts.NO_STYLE``) for the no-style class and, for the
  no-object judge (``no_object=True``), object -1 (``concepts.NO_OBJECT``) for
  "no object". Another benchmark plugs in an object with the same method
  (e.g. the UnlearnCanvas ViT-L classifiers through torch).
  """

  def __init__(self, path: str | None = None, no_object: bool = False):
    self._lib, self._no_style, self._no_object = classifiers, data.NO_STYLE_ID, data.N_OBJECTS
    folder = classifiers.default_path(no_object) if path is None else path
    self.clfs = classifiers.load_classifiers(folder)
    if self.clfs.no_object != no_object:
      raise ValueError(f"the classifiers at {folder} {'lack' if no_object else 'have'} the no-object class: "
                       f"set config.evaluate.classifier to "
                       f"{'canvas_mini_no_object' if self.clfs.no_object else 'canvas_mini'} (or give classifiers that match)")
    kind = "canvas_mini_no_object:" if no_object else "canvas_mini:"
    self.identity = kind + hash_files([os.path.join(folder, classifiers.PARAMS_FILE)])[:16]

  def _ids(self, out: dict) -> dict:
    out["object"] = np.where(out["object"] == self._no_object, concepts.NO_OBJECT, out["object"]).astype(np.int32)
    out["style"] = np.where(out["style"] == self._no_style, concepts.NO_STYLE, out["style"]).astype(np.int32)
    return out

  def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obj, sty = self._lib.predict(self.clfs, images)
    out = self._ids({"object": obj, "style": sty})
    return out["object"], out["style"]

  def assess(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """``predict``'s ids plus confidences and penultimate features (evaluation/quality.py)."""
    return self._ids(self._lib.assess(self.clfs, images))
