"""From a method, an SAE's scores and a concept's setting to clamp entries.

The one place where "erase concept c with SAEmnesia at gamma g" or "with
SAeUron at percentile p and gamma g" becomes ``clamp.Entry`` values; the
evaluate stage, the unlearn stage and the Python API (``api.py``) all call it.

``tables`` are the arrays of a scores folder (``sae/artifacts.load_scores``):
mu / threshold (and, for SAeUron, the importance scores) per domain, the
scored ``timesteps`` and, for SAEmnesia, the concept -> latent
``assignment`` (objects, then styles).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from saemnesia_jax.diffusion import clamp

METHODS = ("saemnesia", "saeuron")
RULES = ("scale", "threshold", "steps", "start")  # optional setting keys: clamp.with_rules
DOMAINS = ("object", "style")


def setting_key(method: str, domain: str, name: str) -> str:
  """The key of a chosen setting, as evaluate's summary.json writes it."""
  return f"{method}/{domain}/{name}"


def concept_entry(method: str, tables: Mapping[str, np.ndarray], domain: str, index: int,
                  setting: Mapping[str, float], assignment: np.ndarray | None = None) -> clamp.Entry:
  """The clamp entry erasing concept ``index`` of ``domain`` with ``method``.

  ``setting``: {'gamma'} for SAEmnesia (the concept's assigned latent at every
  step), {'percentile', 'gamma'} for SAeUron (the latents above that
  percentile of the step's importance scores) and for SAEmnesia as its
  released code selects (the same percentile hook on the supervised SAE's
  scores, ``evaluate.saemnesia_selection=percentile``); optionally the clamp rules
  ``scale`` / ``threshold`` / ``steps`` / ``start`` of ``clamp.with_rules``. ``assignment``: SAEmnesia's
  concept -> latent ids (objects, then styles) as the SAE was trained
  (saemnesia.json); None falls back to the scores' greedy assignment.
  """
  if method not in METHODS:
    raise ValueError(f"unknown erasure method {method!r}; known: {METHODS}")
  if domain not in DOMAINS:
    raise ValueError(f"unknown concept domain {domain!r}; known: {DOMAINS}")
  key = "objects" if domain == "object" else "styles"
  mu, thr = tables[f"mu_{key}"][index], tables[f"threshold_{key}"]
  if method == "saemnesia" and "percentile" not in setting:
    if assignment is None and "assignment" not in tables:
      raise ValueError("these scores hold no assignment: SAEmnesia needs the supervised SAE's scores")
    a = tables["assignment"] if assignment is None else assignment
    n_objects = tables["mu_objects"].shape[0]
    latent = int(a[index if domain == "object" else n_objects + index])
    e = clamp.concept_entry(mu, thr, float(setting["gamma"]), assigned=latent)
  else:
    e = clamp.concept_entry(mu, thr, float(setting["gamma"]), scores_c=tables[f"scores_{key}"][index],
                            percentile=float(setting["percentile"]))
  rules = {k: setting[k] for k in RULES if k in setting}  # absent: the papers' rule
  return clamp.with_rules(e, **rules) if rules else e


def spec_size(entries: Sequence[clamp.Entry], minimum: int = 8) -> int:
  """A power of two that holds the entries' latents (few distinct sizes: few compiles)."""
  m = max(minimum, sum(len(e.latents) for e in entries))
  return 1 << (m - 1).bit_length()


def find_concept(name: str, objects: Sequence[str], styles: Sequence[str]) -> tuple[str, int, str]:
  """(domain, index, canonical name) of a concept name (case-insensitive), objects first."""
  for domain, names in (("object", objects), ("style", styles)):
    low = [str(n).lower() for n in names]
    if name.lower() in low:
      i = low.index(name.lower())
      return domain, i, str(names[i])
  raise KeyError(f"unknown concept {name!r}; known objects: {', '.join(map(str, objects))}; "
                 f"styles: {', '.join(map(str, styles))}")
