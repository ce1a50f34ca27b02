"""Concepts and the prompt grid of the UnlearnCanvas protocol.

A config's ``concepts`` section names the objects and styles and the prompt
templates; the grid is every object x style prompt ("A {object} image in
{style} style.") followed by each object's anchor prompts (no style), as in
UnlearnCanvas. Labels: ``object_id`` in [0, n_objects), ``style_id`` in
[0, n_styles) or -1 (NO_STYLE) for the anchor prompts.

Optional fields of the section (absent = the default):

  spaces_in_prompts  False: names go into prompts as written; True: their
                     underscores become spaces ("Van_Gogh" -> "in Van Gogh
                     style."), as UnlearnCanvas and SAeUron write prompts.
                     The names themselves (class names) keep the underscores.
  no_style           ''; the benchmark's no-style theme ("Seed_Images"): the
                     evaluation's unstyled prompt of an object is then the
                     style template with this theme, as UnlearnCanvas writes
                     it; '' -> the first anchor template.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import ml_collections

NO_STYLE = -1
# A judge's answer "no object in this image" (the CanvasMini no-object judge);
# never a prompt's object, so it counts as erased for UA and as lost for IRA / CRA.
NO_OBJECT = -1


class Prompt(NamedTuple):
  prompt: str
  object_id: int
  style_id: int  # NO_STYLE (-1) for anchor prompts
  variant: int  # anchor template index (0 for styled prompts)


def written(concepts: ml_collections.ConfigDict, name: str) -> str:
  """A concept name as prompts write it (see ``spaces_in_prompts``)."""
  return name.replace("_", " ") if concepts.get("spaces_in_prompts", False) else name


def styled_prompt(concepts: ml_collections.ConfigDict, obj: str, style: str) -> str:
  return concepts.style_template.format(object=written(concepts, obj), style=written(concepts, style))


def unstyled_prompt(concepts: ml_collections.ConfigDict, obj: str) -> str:
  """An object's no-style prompt of the evaluation (UnlearnCanvas' Seed_Images images)."""
  if concepts.get("no_style", ""):
    return styled_prompt(concepts, obj, concepts.no_style)
  return concepts.anchor_templates[0].format(object=written(concepts, obj))


def prompt_grid(concepts: ml_collections.ConfigDict, anchors: bool = True) -> list[Prompt]:
  """Object-major object x style prompts, then the anchor prompts per object."""
  objects, styles = list(concepts.objects), list(concepts.styles)
  if not objects:
    raise ValueError("config.concepts.objects is empty: name at least one object")
  grid = [Prompt(styled_prompt(concepts, o, s), i, j, 0)
          for i, o in enumerate(objects) for j, s in enumerate(styles)]
  if anchors:
    grid += [Prompt(t.format(object=written(concepts, o)), i, NO_STYLE, v)
             for i, o in enumerate(objects) for v, t in enumerate(concepts.anchor_templates)]
  return grid


def evaluation_grid(concepts: ml_collections.ConfigDict, seed_images: bool = True) -> list[Prompt]:
  """The answer set's prompts: every object x style prompt and, with
  ``seed_images``, one unstyled prompt per object (style NO_STYLE), which
  object accuracy counts as UnlearnCanvas does."""
  grid = prompt_grid(concepts, anchors=False)
  if seed_images:
    grid += [Prompt(unstyled_prompt(concepts, o), i, NO_STYLE, 0) for i, o in enumerate(concepts.objects)]
  return grid


ANCHOR_FILE = "sd_prompt_{object}.txt"  # UnlearnCanvas' anchor prompt files, one per object


def anchor_file_grid(concepts: ml_collections.ConfigDict, folder: str, per_object: int = 0) -> list[Prompt]:
  """The collection prompts of SAeUron: each line of each object's anchor
  prompt file (``folder/sd_prompt_{object}.txt``, the first ``per_object``
  lines; 0 = all) in every style ("{line} in {style} style."), in the
  no-style theme (``concepts.no_style``, if set) and on its own ("{line}.").
  ``variant`` is the line's index; the no-style theme and the plain line have
  style NO_STYLE.
  """
  grid = []
  for i, o in enumerate(concepts.objects):
    path = os.path.join(folder, ANCHOR_FILE.format(object=o))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no anchor prompts for object {o!r} at {path}: set config.collect.anchor_prompts_dir "
                              "to the folder of UnlearnCanvas' sd_prompt_<object>.txt files, or '' to collect "
                              "on the concept grid")
    with open(path, encoding="utf-8") as f:
      lines = [ln.strip() for ln in f if ln.strip()]
    lines = lines[:per_object] if per_object > 0 else lines
    if not lines:
      raise ValueError(f"{path} holds no prompts")
    for v, line in enumerate(lines):
      line = line[:-1] if line.endswith(".") else line
      grid += [Prompt(f"{line} in {written(concepts, s)} style.", i, j, v) for j, s in enumerate(concepts.styles)]
      if concepts.get("no_style", ""):
        grid.append(Prompt(f"{line} in {written(concepts, concepts.no_style)} style.", i, NO_STYLE, v))
      grid.append(Prompt(f"{line}.", i, NO_STYLE, v))
  return grid


def lookup(name: str, names: Sequence[str], kind: str) -> int:
  """Index of a concept name (case-insensitive); an unknown name lists the known ones."""
  low = [n.lower() for n in names]
  if name.lower() not in low:
    raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(names)}")
  return low.index(name.lower())


def as_dict(concepts: ml_collections.ConfigDict) -> dict:
  out = {"objects": list(concepts.objects), "styles": list(concepts.styles),
         "style_template": concepts.style_template,
         "anchor_templates": list(concepts.anchor_templates)}
  # Recorded only when set, so that stores collected before the field existed keep their identity.
  if concepts.get("spaces_in_prompts", False):
    out["spaces_in_prompts"] = True
  return out
