"""The protocol: what the released code does (``released``) or the project's choices (``project``).

``config.protocol`` names one of the two, and sets the value of every field
below that is left at its "protocol's" value ('' for a text field, -1 for a
number). A field given a value (in the config file or on the command line)
wins, so either protocol can be changed one difference at a time:

  --config.protocol=released --config.evaluate.kept_error=x_minus_xhat

Each difference, its released source and the project's reason are in
docs/method.md ("The protocol, step by step"). Read a field's value with
``value(config, "evaluate.noise")``; a config without the field (a hand-built
one) gets its protocol's value, and a config without ``protocol`` is on
``project``.

No JAX here: the config checks (runtime/checks.py) import this module before
JAX starts.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from saemnesia_jax.evaluation import concepts

PROTOCOLS = ("released", "project")
AUTO_TEXT = ""  # a text field at this value takes the protocol's
AUTO_NUMBER = -1  # a number field at this value takes the protocol's
CONCEPTS_TEMPLATES = "concepts"  # the prompts of config.concepts (the project's)


class Field(NamedTuple):
  released: Any
  project: Any
  allowed: tuple  # allowed values ('' / -1 aside); () -> any text with the placeholders of ``placeholders``
  placeholders: tuple = ()


# One entry per difference (docs/method.md, the protocol table).
FIELDS = {
    # 1. SAEmnesia's latents: the percentile hook on the supervised SAE's
    #    importance scores (SAEmnesia's sample_unlearning_cls_distr.py), or the
    #    latent it was trained to carry, at every step (the paper's text).
    "evaluate.saemnesia_selection": Field("percentile", "assigned", ("percentile", "assigned")),
    # 2. Evaluation prompts (both releases' samplers).
    "evaluate.style_prompt": Field("An image of {object} in {style} style.", CONCEPTS_TEMPLATES, (),
                                   ("{object}", "{style}")),
    "evaluate.unstyled_prompt": Field("An image of {object}.", CONCEPTS_TEMPLATES, (), ("{object}",)),
    # 3. Starting noise: fresh noise for every image of a seed (the released
    #    samplers advance one generator per run), or one noise per seed shared
    #    by all its prompts.
    "evaluate.noise": Field("per_image", "per_seed", ("per_image", "per_seed")),
    # 4. Metrics: style-erasure CRA on the unstyled images only (SAeUron's
    #    accuracy_unlearncanvas_fast.py) or on every image; judged after a
    #    JPEG save at PIL's default quality 75 (the samplers' img.save), or raw.
    "evaluate.style_cra": Field("unstyled", "all", ("unstyled", "all")),
    "evaluate.jpeg_quality": Field(75, 0, ()),
    # 5. SAeUron's styles: one fixed setting for every style (README 5.2), or
    #    the sweep over percentiles x gammas that objects get.
    "evaluate.saeuron_styles": Field("fixed", "sweep", ("fixed", "sweep")),
    # 9. Precision of sampling and of the clamp's SAE: float16 (the released
    #    pipelines and load_sae), or model.dtype and float32.
    "evaluate.dtype": Field("float16", "model", ("float16", "bfloat16", "float32", "model")),
    "evaluate.sae_dtype": Field("float16", "float32", ("float16", "bfloat16", "float32")),
    # 11. The kept reconstruction error: decode(z_edit) + (x_hat - x) (hooks.py,
    #     err = recon - x), or x + decode(z_edit) - decode(z).
    "evaluate.kept_error": Field("xhat_minus_x", "x_minus_xhat", ("xhat_minus_x", "x_minus_xhat")),
}

# Parameters read only where a protocol field takes a value: recorded in a
# fingerprint only then (CanvasMini's runs keep their identity).
PARAMETERS = {
    "evaluate.saemnesia_percentiles": ("evaluate.saemnesia_selection", "percentile"),
    "evaluate.saeuron_style_setting": ("evaluate.saeuron_styles", "fixed"),
}


def protocol_of(config) -> str:
  return str(config.get("protocol", "project")) if hasattr(config, "get") else "project"


def _raw(config, field: str) -> Any:
  node = config
  for part in field.split("."):
    if not hasattr(node, "get") or part not in node:
      return None
    node = node[part]
  return node


def _is_auto(v: Any) -> bool:
  return v is None or (isinstance(v, str) and v == AUTO_TEXT) or (
      isinstance(v, (int, float)) and not isinstance(v, bool) and v == AUTO_NUMBER)


def value(config, field: str) -> Any:
  """The value of protocol field ``field``: the config's, or its protocol's."""
  raw = _raw(config, field)
  if not _is_auto(raw):
    return raw
  p = protocol_of(config)
  if p not in PROTOCOLS:
    raise ValueError(f"config.protocol={p!r}: expected one of {PROTOCOLS}")
  return getattr(FIELDS[field], p)


def is_project(config, field: str) -> bool:
  return value(config, field) == FIELDS[field].project


def check(config) -> list[tuple[str, Any, str]]:
  """(field, value, why) of each bad protocol value; [] if all are good."""
  bad = []
  p = protocol_of(config)
  if p not in PROTOCOLS:
    return [("protocol", p, f"expected one of {', '.join(map(repr, PROTOCOLS))}")]
  for f, spec in FIELDS.items():
    raw = _raw(config, f)
    if _is_auto(raw):
      continue
    if f == "evaluate.jpeg_quality":
      if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 100:
        bad.append((f, raw, "a JPEG quality in 1..100, 0 (judge the raw images) or -1 (the protocol's)"))
    elif spec.allowed:
      if raw not in spec.allowed:
        bad.append((f, raw, f"expected one of {', '.join(map(repr, spec.allowed))} or '' (the protocol's)"))
    elif raw != CONCEPTS_TEMPLATES and (not isinstance(raw, str) or
                                        any(ph not in raw for ph in spec.placeholders)):
      bad.append((f, raw, f"a template with {' and '.join(spec.placeholders)}, {CONCEPTS_TEMPLATES!r} "
                          "(config.concepts' prompts) or '' (the protocol's)"))
  ps = _raw(config, "evaluate.saemnesia_percentiles")
  if ps is not None and (not ps or any(not isinstance(p_, (int, float)) or not 0 < p_ < 100 for p_ in ps)):
    bad.append(("evaluate.saemnesia_percentiles", ps, "one or more percentiles, each in (0, 100)"))
  fs = _raw(config, "evaluate.saeuron_style_setting")
  if fs is not None and (len(fs) != 2 or not 0 < fs[0] < 100 or fs[1] > 0):
    bad.append(("evaluate.saeuron_style_setting", fs, "(percentile in (0, 100), gamma <= 0)"))
  return bad


# ------------------------------------------------------------ fingerprints


def raw_fields(config, sections: Sequence[str]) -> tuple[str, ...]:
  """The protocol fields and parameters under ``sections`` as the config spells
  them: left out of a fingerprint, which records ``settings`` instead."""
  return tuple(f for f in (*FIELDS, *PARAMETERS) if f.split(".", 1)[0] in sections)


def settings(config, sections: Sequence[str]) -> dict[str, Any]:
  """The resolved values that differ from the project's, and the parameters
  they read: what a fingerprint records of the protocol. A run on ``project``
  records nothing, so runs made before these fields existed keep matching."""
  out = {}
  for f, spec in FIELDS.items():
    if f.split(".", 1)[0] in sections and not is_project(config, f):
      out[f] = value(config, f)
  for p, (f, v) in PARAMETERS.items():
    if p.split(".", 1)[0] in sections and value(config, f) == v:
      out[p] = _raw(config, p)
  return json.loads(json.dumps(out, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ----------------------------------------------------------------- prompts


def styled_prompt(config, obj: str, style: str) -> str:
  """The evaluation's prompt of (object, style) under ``evaluate.style_prompt``."""
  t = value(config, "evaluate.style_prompt")
  if t == CONCEPTS_TEMPLATES:
    return concepts.styled_prompt(config.concepts, obj, style)
  # The released samplers write the style with spaces and the object verbatim.
  return t.format(object=obj, style=style.replace("_", " "))


def unstyled_prompt(config, obj: str) -> str:
  t = value(config, "evaluate.unstyled_prompt")
  if t == CONCEPTS_TEMPLATES:
    return concepts.unstyled_prompt(config.concepts, obj)
  return t.format(object=obj)


def evaluation_grid(config) -> list:
  """The answer set's prompts (``concepts.evaluation_grid``'s order and labels)
  with the protocol's prompts."""
  c = config.concepts
  seed_images = bool(config.evaluate.get("seed_images", True)) if "evaluate" in config else True
  if (value(config, "evaluate.style_prompt") == CONCEPTS_TEMPLATES
      and value(config, "evaluate.unstyled_prompt") == CONCEPTS_TEMPLATES):
    return concepts.evaluation_grid(c, seed_images=seed_images)
  grid = [concepts.Prompt(styled_prompt(config, o, s), i, j, 0)
          for i, o in enumerate(c.objects) for j, s in enumerate(c.styles)]
  if seed_images:
    grid += [concepts.Prompt(unstyled_prompt(config, o), i, concepts.NO_STYLE, 0) for i, o in enumerate(c.objects)]
  return grid


# ------------------------------------------------------------------- noise


def image_seed(seed: int, index: int) -> int:
  """The noise seed of image ``index`` of an answer set sampled at ``seed``
  (``evaluate.noise=per_image``): distinct per image, the same in every
  erasure of that seed (so erased and unerased images stay paired)."""
  digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def noise_seeds(config, n_prompts: int, seeds: Sequence[int]) -> list[int]:
  """The sampler's seed of each (prompt, seed) pair, prompt-major as the
  evaluation lays them out: the seed itself (``per_seed``: every prompt of a
  seed starts from the same noise) or ``image_seed`` (``per_image``)."""
  per_image = value(config, "evaluate.noise") == "per_image"
  return [image_seed(s, i) if per_image else int(s) for i in range(n_prompts) for s in seeds]


# --------------------------------------------------------------- precision


def sampling_model(config):
  """``config`` with the evaluation's sampling precision (``evaluate.dtype``) as
  model.dtype; ``config`` itself where that is model.dtype."""
  d = value(config, "evaluate.dtype")
  if d == "model" or d == config.model.dtype:
    return config
  out = copy.deepcopy(config)
  out.model.dtype = d
  return out


# ------------------------------------------------------------------ judging


def jpeg_roundtrip(images, quality: int):
  """``images`` (N, H, W, 3) in [0, 1] as the released samplers save and the
  accuracy scripts read them: uint8 (diffusers' numpy_to_pil rounding), a
  JPEG at ``quality`` (PIL's default 4:2:0 subsampling), read back; 0 -> unchanged."""

  if not quality:
    return images
  out = []
  for img in np.asarray(images):
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)).save(buf, format="JPEG",
                                                                                   quality=int(quality))
    buf.seek(0)
    out.append(np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0)
  return np.stack(out) if out else np.asarray(images)


def judged_images(config, images):
  """The images the judge sees under ``evaluate.jpeg_quality``."""
  return jpeg_roundtrip(images, int(value(config, "evaluate.jpeg_quality")))
