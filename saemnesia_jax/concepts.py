"""Concepts and the prompt grid of the UnlearnCanvas protocol.

A config's ``concepts`` section names the objects and styles and the prompt
templates; the grid is every object x style prompt ("A {object} image in
{style} style.") followed by each object's anchor prompts (no style), as in
UnlearnCanvas. Labels: ``object_id`` in [0, n_objects), ``style_id`` in
[0, n_styles) or -1 (NO_STYLE) for the anchor prompts.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import ml_collections

NO_STYLE = -1


class Prompt(NamedTuple):
  prompt: str
  object_id: int
  style_id: int  # NO_STYLE (-1) for anchor prompts
  variant: int  # anchor template index (0 for styled prompts)


def prompt_grid(concepts: ml_collections.ConfigDict, anchors: bool = True) -> list[Prompt]:
  """Object-major object x style prompts, then the anchor prompts per object."""
  objects, styles = list(concepts.objects), list(concepts.styles)
  if not objects:
    raise ValueError("config.concepts.objects is empty: name at least one object")
  grid = [Prompt(concepts.style_template.format(object=o, style=s), i, j, 0)
          for i, o in enumerate(objects) for j, s in enumerate(styles)]
  if anchors:
    grid += [Prompt(t.format(object=o), i, NO_STYLE, v)
             for i, o in enumerate(objects) for v, t in enumerate(concepts.anchor_templates)]
  return grid


def lookup(name: str, names: Sequence[str], kind: str) -> int:
  """Index of a concept name (case-insensitive); an unknown name lists the known ones."""
  low = [n.lower() for n in names]
  if name.lower() not in low:
    raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(names)}")
  return low.index(name.lower())


def as_dict(concepts: ml_collections.ConfigDict) -> dict:
  return {"objects": list(concepts.objects), "styles": list(concepts.styles),
          "style_template": concepts.style_template,
          "anchor_templates": list(concepts.anchor_templates)}
