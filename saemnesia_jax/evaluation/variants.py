"""Erasure rules beside the papers' (``evaluate.variants``), with the same trial budget.

The papers fix how the clamp pushes (``z_i <- gamma * mu_target * z_i`` at
every step, where z_i exceeds the mean activation over concepts) and how a
sweep setting is chosen ((UA + IRA) / 2). They leave open the rest; a variant
names other choices, and the evaluation runs it for *every* method (SAeUron
and SAEmnesia alike) beside the papers' rule, whose rows keep the method's
plain name (the Table-1 rows labelled with the paper's name).

A variant is one string, ``"<name>: key=value key=value ..."``:

* ``scale=mu|self``, ``threshold=mean|zero|target``, ``steps=<share>``,
  ``start=<share>``: the clamp rules of ``clamp.with_rules``; ``a/b`` puts
  a rule in the sweep's grid (``threshold=mean/target`` sweeps every gamma
  under both thresholds: twice the trials, for every method alike);
* ``gammas=<g1>/<g2>/...``: the variant's gamma grid (default
  ``evaluate.gammas``); give as many as the papers' grid for the same trials;
* ``gammas.<method>=<g1>/...``: that method's grid alone, e.g.
  ``gammas.saemnesia=`` with 8 gammas gives SAEmnesia the 8 trials per
  concept that SAeUron's 2 percentiles x 4 gammas take (equal budgets);
* ``select=ua_ira|ua_ira_cra|ua_ira_recognised|coherent_ira|ua_coherent_ira``:
  how the sweep picks a setting per concept: (UA + IRA) / 2 (the papers'),
  (UA + IRA + CRA) / 3, (UA + IRA + recognised) / 3 (evaluation/quality.py: the other
  domain still recognised on the erased concept's images),
  (coherent + IRA) / 2, where coherent is the share of the erased concept's
  images that are erased *and* still recognised (evaluation/quality.py): UA that does
  not count an image turned to noise; or (UA + coherent + IRA) / 3, which
  rewards erasure, and erasure that keeps the picture, and the other
  concepts, equally.

E.g. ``"self: scale=self gammas=0/-0.5/-1/-2"``. A variant that changes only
``select`` reuses the papers' sweep (no extra sampling).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Mapping, Sequence

from saemnesia_jax.evaluation.metrics import sweep_score
from saemnesia_jax.runtime.errors import ConfigError

# Clamp rules (clamp.with_rules); the first value of each is the papers'.
SCALES = ("mu", "self")  # multiplier gamma * mu_target(i, t) | gamma alone (relative to z_i itself)
# edit where z_i > the mean over concepts of mu_c(i, t) | wherever z_i > 0 | where z_i > mu_target(i, t)
# (only tokens at least as active as the erased concept's own mean: fewer edits of other concepts' tokens)
THRESHOLDS = ("mean", "zero", "target")
SELECTIONS = ("ua_ira", "ua_ira_cra", "ua_ira_recognised", "coherent_ira", "ua_coherent_ira")
PICTURE_SELECTIONS = ("ua_ira_recognised", "coherent_ira", "ua_coherent_ira")  # need the judge's confidences
_KEYS = ("scale", "threshold", "steps", "start", "gammas", "select")
PAPER_RULES = {"scale": SCALES[0], "threshold": THRESHOLDS[0], "steps": 1.0, "start": 0.0}
METHODS = ("saemnesia", "saeuron")  # the ``gammas.<method>`` keys


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # '' for the papers' rule
  # clamp.with_rules keywords that differ from the papers'; a tuple value is a grid (rule_grid)
  rules: tuple[tuple[str, Any], ...] = ()
  gammas: tuple[float, ...] | None = None  # None: evaluate.gammas
  select: str = "ua_ira"
  method_gammas: tuple[tuple[str, tuple[float, ...]], ...] = ()  # per-method grids (gammas.<method>=)

  def gammas_of(self, method: str, default: Sequence[float]) -> tuple[float, ...]:
    """``method``'s gamma grid under this variant."""
    return dict(self.method_gammas).get(method) or self.gammas or tuple(default)

  def label(self, method: str) -> str:
    """The method's row label: its plain name under the papers' rule."""
    return method if not self.name else f"{method} [{self.name}]"


PAPER = Variant("")


def _fail(text: str, why: str) -> None:
  raise ConfigError(f"config.evaluate.variants: {text!r}: {why}; write \"<name>: key=value ...\" with keys "
                    f"{', '.join(_KEYS)} (e.g. \"self: scale=self gammas=0/-0.5/-1/-2\")")


def parse(text: str) -> Variant:
  name, sep, body = str(text).partition(":")
  name = name.strip()
  if not sep or not name or any(c in name for c in "[]/"):
    _fail(text, "no name (or a name with [ ] /) before ':'")
  rules, gammas, select, per_method = {}, None, "ua_ira", {}
  for tok in body.split():
    key, eq, value = tok.partition("=")
    base, dot, method = key.partition(".")
    if not eq or base not in _KEYS or (dot and (base != "gammas" or method not in METHODS)):
      _fail(text, f"{tok!r} is not key=value with a known key (gammas.<method> with a method of {METHODS})")
    if base == "gammas":
      try:
        grid = tuple(float(g) for g in value.split("/"))
      except ValueError:
        _fail(text, f"{key}={value!r} are not numbers separated by '/'")
      if any(not math.isfinite(g) or g > 0 for g in grid):
        _fail(text, "gammas must be <= 0 (the clamp erases by pushing against the concept)")
      if dot:
        per_method[method] = grid
      else:
        gammas = grid
    elif key == "select":
      if value not in SELECTIONS:
        _fail(text, f"select={value!r}; known: {', '.join(SELECTIONS)}")
      select = value
    else:
      # "a/b" makes the rule part of the sweep's grid (e.g. threshold=mean/target).
      values = tuple(dict.fromkeys(_rule_value(text, key, v) for v in value.split("/")))
      rules[key] = values[0] if len(values) == 1 else values
  # The papers' value of a rule is no rule: such settings share the papers' units.
  rules = {k: v for k, v in rules.items() if v != PAPER_RULES[k]}
  return Variant(name, tuple(sorted(rules.items())), gammas, select, tuple(sorted(per_method.items())))


def _rule_value(text: str, key: str, value: str) -> Any:
  if key in ("steps", "start"):
    try:
      out = float(value)
    except ValueError:
      _fail(text, f"{key}={value!r} is not a number")
    if key == "steps" and not 0 < out <= 1:
      _fail(text, "steps is the share of the sampling steps with the clamp on, in (0, 1]")
    if key == "start" and not 0 <= out < 1:
      _fail(text, "start is the share of the sampling steps before the clamp acts, in [0, 1)")
    return out
  known = SCALES if key == "scale" else THRESHOLDS
  if value not in known:
    _fail(text, f"{key}={value!r}; known: {', '.join(known)}")
  return value


def rule_grid(v: Variant) -> list[dict[str, Any]]:
  """The clamp rules of each of ``v``'s sweep settings: one dict per
  combination of its rule grids, without the papers' values (so that those
  settings are the papers' units)."""
  keys = [k for k, _ in v.rules]
  grids = [val if isinstance(val, tuple) else (val,) for _, val in v.rules]
  return [{k: x for k, x in zip(keys, combo) if x != PAPER_RULES[k]} for combo in itertools.product(*grids)]


def variants(config) -> list[Variant]:
  """The papers' rule, then ``evaluate.variants`` in order (names unique)."""
  out = [PAPER] + [parse(t) for t in config.evaluate.get("variants", ())]
  names = [v.name for v in out[1:]]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ConfigError(f"config.evaluate.variants: the name {dup[0]!r} is used twice; give each variant its own")
  return out


def headline_choices(data: Mapping[str, Any]) -> dict[str, dict]:
  """Chosen settings {'method/domain/concept': setting} of an evaluation's
  summary.json or a chosen.json. With a rule chosen on development seeds
  (``evaluate.rule_seeds``; the file's ``headline``: {method -> row label}),
  each method's plain key carries the setting of its chosen row, so that
  unlearn and attack apply the erasure the table's headline measured."""
  chosen = dict(data.get("chosen", data))
  for method, label in dict(data.get("headline") or {}).items():
    prefix = f"{label}/"
    for key, setting in list(chosen.items()):
      if key.startswith(prefix):
        chosen[f"{method}/{key[len(prefix):]}"] = setting
  return chosen


def method_of(label: str) -> str:
  return label.split(" [", 1)[0]


def score(select: str, metrics: Mapping[str, float], picture: Mapping[str, float] | None = None) -> float:
  """The sweep's criterion (higher is better), from a unit's UA / IRA / CRA
  (fractions) and, for the picture selections, the erased concept's
  ``recognised`` and ``coherent`` shares (evaluate_plan.picture)."""
  if select == "ua_ira":
    return sweep_score(metrics)
  if select == "ua_ira_cra":
    return (metrics["UA"] + metrics["IRA"] + metrics["CRA"]) / 3
  if select in PICTURE_SELECTIONS:
    if picture is None:
      raise ConfigError(f"select={select} needs a judge with assess() (confidences): the built-in "
                        "canvas_mini, canvas_mini_no_object and unlearncanvas judges have it")
    nan0 = lambda v: 0.0 if math.isnan(v) else v
    if select == "ua_ira_recognised":
      return (metrics["UA"] + metrics["IRA"] + nan0(picture["recognised"])) / 3
    if select == "ua_coherent_ira":
      return (metrics["UA"] + nan0(picture["coherent"]) + metrics["IRA"]) / 3
    return (nan0(picture["coherent"]) + metrics["IRA"]) / 2
  raise ValueError(f"unknown selection {select!r}; known: {SELECTIONS}")


def describe(v: Variant, default_gammas: Sequence[float]) -> str:
  """One line for the tables' notes."""
  if not v.name:
    return "the papers' rule: gamma x mu_target, threshold mean mu, every step, (UA + IRA) / 2"
  rules = ", ".join(f"{k}={'/'.join(map(str, val)) if isinstance(val, tuple) else val}" for k, val in v.rules)
  rules = rules or "the papers' clamp"
  grids = "; ".join(f"{m} gammas {v.gammas_of(m, default_gammas)}" for m in METHODS)
  return f"{v.name}: {rules}; {grids}; select {v.select}"
