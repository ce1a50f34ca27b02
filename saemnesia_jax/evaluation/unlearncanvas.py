"""UnlearnCanvas's classes and classifier files (the judge itself: judges/unlearncanvas.py).

UnlearnCanvas (docs/method.md section 6) scores images with two fine-tuned timm
``vit_large_patch16_224`` classifiers saved as PyTorch checkpoints:

  {classifier_dir}/style_classifier.pth   51 classes: the 50 styles and Seed_Images
  {classifier_dir}/object_classifier.pth  20 classes

each a dict with the state dict under ``model_state_dict``, the classes in the
alphabetical order of their names (``STYLE_CLASSES`` / ``OBJECT_CLASSES``),
and inputs resized to 224 x 224 and scaled to [-1, 1]. ``judges/vit.py``
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


def find_classifier(classifier_dir: str, task: str) -> str:
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
