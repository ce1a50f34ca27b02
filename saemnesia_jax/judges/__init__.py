"""Judges: the classifiers that decide what an image shows (object and style).

A judge has ``predict(images (N, H, W, 3) in [0, 1]) -> (object ids, style ids)``
(style -1 for the no-style class, object -1 for "no object" where the judge
can say so), optionally ``assess(images)`` with confidences and features, and
an ``identity`` string for run fingerprints. Built in: the CanvasMini
classifiers (``canvas_mini``, ``canvas_mini_no_object``) and the UnlearnCanvas
ViT-L classifiers (``unlearncanvas``); ``from_spec('module:factory')`` plugs in
any other.
"""
from __future__ import annotations

import importlib
from typing import Any

from saemnesia_jax.runtime.errors import UserError

KINDS = ("canvas_mini", "canvas_mini_no_object", "unlearncanvas")


def make_judge(config: Any) -> Any:
  """The judge of ``config.evaluate.classifier``."""
  kind = config.evaluate.classifier
  # Deferred: each judge loads JAX and its own model code; importing this package stays light.
  if kind in ("canvas_mini", "canvas_mini_no_object"):
    from saemnesia_jax.judges import canvas_mini  # deferred: each judge loads JAX and its model
    return canvas_mini.CanvasMiniJudge(no_object=kind == "canvas_mini_no_object")
  if kind == "unlearncanvas":
    from saemnesia_jax.judges import unlearncanvas  # deferred: each judge loads JAX and its model
    return unlearncanvas.unlearncanvas_judge(config)
  raise ValueError(f"config.evaluate.classifier={kind!r}: built in are 'canvas_mini', 'canvas_mini_no_object' and "
                   "'unlearncanvas'; or "
                   "pass an object with predict(images) -> (object_ids, style_ids) to Evaluation(judge=...)")


def from_spec(spec: str) -> Any:
  """'module:factory' -> factory(): a judge of the user's (``pipeline.judge``)."""
  if not spec:
    return None
  if ":" not in spec:
    raise UserError(f"config.pipeline.judge={spec!r} must be 'module:factory', e.g. 'my_judges:make'")
  mod, attr = spec.split(":", 1)
  return getattr(importlib.import_module(mod), attr)()
