"""The UnlearnCanvas protocol as configs/sd15.py states it: each test pins one
setting of the published protocol (evaluation steps, prompts, answer set,
sequential range, trained assignment, blocks, collection, training budget)."""
import os
import sys

import ml_collections
import numpy as np
import pytest

from saemnesia_jax import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import canvas_mini  # noqa: E402
import sd15  # noqa: E402


# ---------------------------------------------------------- 7: sequential


def test_sequential_unlearning_reaches_the_papers_nine_objects():
  """SAEmnesia's +28.4% UA claim is at 9 objects erased at once."""
  c = sd15.get_config()
  c.evaluate.methods = ("none", "saemnesia")
  chosen = {("saemnesia", "object", o): {"gamma": -1.0} for o in c.concepts.objects}
  units = evaluate.sequential_units(c, chosen)
  assert [u["n"] for u in units] == list(range(1, 10))
  assert units[-1]["objects"] == list(c.evaluate.sequential_objects)
  assert len(units[-1]["erase"]) == 9


def test_sequential_over_every_object_keeps_one_for_ira():
  """CanvasMini's order is every object: the last point keeps one (IRA needs it)."""
  c = canvas_mini.get_config()
  c.evaluate.methods = ("saeuron",)
  chosen = {("saeuron", "object", o): {} for o in c.concepts.objects}
  assert [u["n"] for u in evaluate.sequential_units(c, chosen)] == list(range(1, len(c.concepts.objects)))
