"""The evaluation's plan: its work units, and the choice of each concept's setting.

Units (``runtime/units.py``) are keyed by their fields, so every phase can be
resumed and split over processes:

* sweep units: every (method, erasure rule, concept, setting, sweep seed),
  plus one no-erasure baseline per sweep seed. One unit per seed, because
  every image of a seed starts from the same noise: the seed, not the image,
  is the sweep's unit of evidence, and another seed adds units without
  redoing the ones already sampled. A rule variant that only changes the
  selection criterion shares the papers' units (``evaluation/variants.py``).
* rule units (with ``evaluate.rule_seeds``): each row's chosen settings on the
  development seeds, where each method's rule (the papers' or a variant) is
  chosen by its Table-1 average; only the chosen rows and the papers' go on.
* final units: each row's chosen setting per concept, on the held-out seeds.
* sequential units: the first 1, 2, ... objects erased at once, with their
  chosen settings (the papers' rule).

``choose`` picks per (row label, domain, concept) by the row's criterion;
``evaluate.chosen_from`` takes an earlier evaluation's choices instead.
"""
from __future__ import annotations

import copy

import numpy as np

from saemnesia_jax.evaluation import concepts, intervals, metrics, protocol, quality
from saemnesia_jax.evaluation import variants as variants_lib
from saemnesia_jax.runtime import units as units_lib
from saemnesia_jax.runtime.errors import ConfigError
from saemnesia_jax.runtime.io_utils import read_json


def settings(config, method: str, variant: variants_lib.Variant = variants_lib.PAPER,
             domain: str = "object") -> list[dict]:
  """The sweep's settings of ``method`` under ``variant`` (its gammas and clamp
  rules) for the concepts of ``domain``. The protocol (evaluation/protocol.py)
  adds SAEmnesia's percentiles (``evaluate.saemnesia_selection=percentile``)
  and fixes SAeUron's styles (``evaluate.saeuron_styles=fixed``)."""
  ev = config.evaluate
  fixed = fixed_setting(config, method, variant, domain)
  if fixed is not None:
    return [fixed]
  gammas = variant.gammas_of(method, ev.gammas)
  grid = variants_lib.rule_grid(variant)
  if method == "saemnesia":
    if protocol.value(config, "evaluate.saemnesia_selection") == "percentile":
      return [{"percentile": float(p), "gamma": float(g), **rules}
              for rules in grid for p in ev.saemnesia_percentiles for g in gammas]
    return [{"gamma": float(g), **rules} for rules in grid for g in gammas]
  if method == "saeuron":
    return [{"percentile": float(p), "gamma": float(g), **rules}
            for rules in grid for p in ev.percentiles for g in gammas]
  return [{}]


def fixed_setting(config, method: str, variant: variants_lib.Variant, domain: str) -> dict | None:
  """The one setting of a row that is not swept, or None: SAeUron's styles under
  ``evaluate.saeuron_styles=fixed`` (the papers' rule only; a variant sweeps its grid)."""
  if (method == "saeuron" and domain == "style" and not variant.name
          and protocol.value(config, "evaluate.saeuron_styles") == "fixed"):
    p, g = config.evaluate.saeuron_style_setting
    return {"percentile": float(p), "gamma": float(g)}
  return None


def arms(config) -> list[tuple[str, variants_lib.Variant]]:
  """(method, variant) of every erasing row: the papers' rule, then each variant."""
  return [(m, v) for v in variants_lib.variants(config) for m in config.evaluate.methods if m != "none"]


def grid_arms(config) -> list[tuple[str, variants_lib.Variant]]:
  """The erasure grid's (method, variant) rows: every arm, or the ones whose
  table labels ``evaluate.grid_rows`` names, in the table's order. With many
  rules the full grid is tens of rows; naming a few keeps it readable."""
  every = arms(config)
  wanted = list(config.evaluate.get("grid_rows", ()))
  if not wanted:
    return every
  labels = [v.label(m) for m, v in every]
  unknown = [w for w in wanted if w not in labels]
  if unknown:
    raise ConfigError(f"config.evaluate.grid_rows: {unknown[0]!r} is not a row of this evaluation; "
                      f"its rows are {', '.join(labels)}")
  return [(m, v) for m, v in every if v.label(m) in wanted]


def _unique(units: list[dict]) -> list[dict]:
  """Units once each (a variant may share units with the papers' rule)."""
  seen, out = set(), []
  for u in units:
    uid = units_lib.unit_id(u)
    if uid not in seen:
      seen.add(uid)
      out.append(u)
  return out


def targets(config) -> list[tuple[str, str]]:
  ev = config.evaluate
  objs = list(ev.objects) or list(config.concepts.objects)
  stys = list(ev.styles) or list(config.concepts.styles)
  for n in objs:
    concepts.lookup(n, config.concepts.objects, "object")
  for n in stys:
    concepts.lookup(n, config.concepts.styles, "style")
  return [("object", n) for n in objs] + [("style", n) for n in stys]


def sweep_units(config) -> list[dict]:
  ev = config.evaluate
  seeds = _sweep_seeds(config)
  out = [{"phase": "sweep", "method": "none", "seeds": [s]} for s in seeds] if "none" in ev.methods else []
  reused = {label for label, _, _ in reused_choices(config)}
  for m, v in arms(config):
    if v.label(m) in reused:
      continue
    for d, n in targets(config):
      if fixed_setting(config, m, v, d) is not None:
        continue  # nothing to choose
      for s in settings(config, m, v, d):
        out += sweep_trial(config, m, d, n, s)
  return _unique(out)


def _sweep_seeds(config) -> list[int]:
  seeds = [int(s) for s in config.evaluate.sweep_seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.evaluate.sweep_seeds={tuple(seeds)}: give one or more distinct seeds, e.g. (1, 5, 6)")
  return seeds


def sweep_trial(config, method: str, domain: str, name: str, setting: dict) -> list[dict]:
  """One trial of the sweep (a setting of one concept): a unit per sweep seed."""
  return [{"phase": "sweep", "method": method, "domain": domain, "concept": name, "setting": setting,
           "erase": [[domain, name, setting]], "seeds": [s]} for s in _sweep_seeds(config)]


def pooled(results: units_lib.UnitResults, units: list[dict]) -> dict:
  """The answers of ``units`` (one trial's seeds) as one answer set."""
  return pool_answers([results.read(u) for u in units])


def pool_answers(parts: list[dict]) -> dict:
  """Answer sets (unit results) as one, their per-image lists joined in order."""
  keys = [k for k, v in parts[0].items() if isinstance(v, list) and k != units_lib.ARRAYS]
  return {k: [x for p in parts for x in p[k]] for k in keys}


def _answer(result: dict):
  return (np.asarray(result["true_object"]), np.asarray(result["true_style"]),
          np.asarray(result["pred_object"]), np.asarray(result["pred_style"]))


def unit_metrics(result: dict, domain: str, erased: list[str], config) -> dict:
  return metrics.erasure_metrics(*_answer(result), erased, domain,
                                 object_names=list(config.concepts.objects),
                                 style_names=list(config.concepts.styles),
                                 cra_unstyled_only=protocol.value(config, "evaluate.style_cra") == "unstyled")


def answer_quality(config, r: dict, domain: str, name: str, feats=None, base_feats=None) -> dict:
  """quality.erasure_quality of answer set ``r`` for the erased concept
  ``name``; {} where the judge gave no confidences."""
  if "conf_object" not in r:
    return {}
  names = config.concepts.objects if domain == "object" else config.concepts.styles
  cid = concepts.lookup(name, names, domain)
  other = "style" if domain == "object" else "object"
  return quality.erasure_quality(np.asarray(r[f"true_{domain}"]) == cid, feats, base_feats,
                                 *(np.asarray(r[f"{k}_{other}"]) for k in ("true", "pred", "conf")),
                                 float(config.evaluate.recognised_confidence),
                                 gone=np.asarray(r[f"pred_{domain}"]) != cid)


def unit_quality(config, results: units_lib.UnitResults, unit: dict, base: dict | None, domain: str,
             name: str) -> dict:
  """quality.erasure_quality of one final unit against the no-erasure unit
  (same prompts and seeds); {} where the judge gave no confidences."""
  r = results.read(unit)
  if "conf_object" not in r:
    return {}
  feats = results.read_arrays(unit).get("features")
  base_feats = results.read_arrays(base).get("features") if base is not None else None
  return answer_quality(config, r, domain, name, feats, base_feats)


def picture(config, result: dict, domain: str, name: str) -> dict[str, float] | None:
  """The erased concept's images in ``result``: ``recognised`` (the other
  domain still recognised) and ``coherent`` (erased and still recognised)
  shares; None where the judge gave no confidences."""
  return answer_quality(config, result, domain, name) or None


def choose(config, results: units_lib.UnitResults) -> dict[tuple[str, str, str], dict]:
  """Per (row label, domain, concept): the sweep setting that scores best by
  the row's criterion (the papers': (UA + IRA) / 2; see evaluation/variants.py)."""
  best, reused = {}, reused_choices(config)
  reused_labels = {label for label, _, _ in reused}
  for m, v in arms(config):
    if v.label(m) in reused_labels:
      continue
    for d, n in targets(config):
      fixed = fixed_setting(config, m, v, d)
      if fixed is not None:
        best[(v.label(m), d, n)] = (0.0, fixed)
        continue
      for s in settings(config, m, v, d):
        r = pooled(results, sweep_trial(config, m, d, n, s))
        score = variants_lib.score(v.select, unit_metrics(r, d, [n], config),
                                   picture(config, r, d, n) if v.select in variants_lib.PICTURE_SELECTIONS else None)
        key = (v.label(m), d, n)
        if key not in best or score > best[key][0]:
          best[key] = (score, s)
  return {**reused, **{k: v[1] for k, v in best.items()}}


def reused_choices(config) -> dict[tuple[str, str, str], dict]:
  """The settings ``evaluate.chosen_from`` (an earlier evaluation's
  summary.json or chosen.json, same grid) chose, for every row it covers
  whole: those rows skip their sweep. A choice outside this grid is an error."""
  path = config.evaluate.get("chosen_from", "")
  if not path:
    return {}
  data = read_json(path)
  chosen, out = data.get("chosen", data), {}
  for m, v in arms(config):
    label = v.label(m)
    picked = {(d, n): chosen.get(f"{label}/{d}/{n}") for d, n in targets(config)}
    if any(s is None for s in picked.values()):
      continue
    for (d, n), s in picked.items():
      grid = settings(config, m, v, d)
      if s not in grid:
        raise ValueError(f"config.evaluate.chosen_from={path}: {label}/{d}/{n} chose {s}, which is not in "
                         f"this evaluation's grid {grid}: give the grid it was chosen from, or drop chosen_from")
      out[(label, d, n)] = dict(s)
  return out


def final_unit(config, label: str, domain: str, name: str, setting: dict) -> dict:
  return {"phase": "final", "method": variants_lib.method_of(label), "domain": domain, "concept": name,
          "setting": setting, "erase": [[domain, name, setting]], "seeds": list(config.evaluate.eval_seeds)}


def final_units(config, chosen) -> list[dict]:
  ev = config.evaluate
  out = [{"phase": "final", "method": "none", "seeds": list(ev.eval_seeds)}] if "none" in ev.methods else []
  out += [final_unit(config, label, d, n, s) for (label, d, n), s in sorted(chosen.items())]
  return _unique(out)


def with_eval_seeds(config, seeds):
  """A copy of ``config`` whose held-out seeds are ``seeds``."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.evaluate.eval_seeds = tuple(int(s) for s in seeds)
  return out


def rule_units(config, chosen) -> list[dict]:
  """Every row's chosen settings on ``evaluate.rule_seeds`` (none without them):
  the development set on which each method's rule is chosen."""
  seeds = tuple(config.evaluate.get("rule_seeds", ()))
  return final_units(with_eval_seeds(config, seeds), chosen) if seeds else []


def choose_rules(config, results: units_lib.UnitResults, chosen) -> dict:
  """Per method, the row whose Table-1 average on ``evaluate.rule_seeds`` is the
  highest (ties keep the earlier row: the papers' rule first), so that the table
  on ``eval_seeds`` reports a rule chosen without them. Returns {'avg': {row
  label -> average on the development seeds}, 'chosen': {method -> row label}}."""
  dev = with_eval_seeds(config, config.evaluate.rule_seeds)
  avg, best = {}, {}
  for m, v in arms(config):
    label = v.label(m)
    rows = [{"domain": d, **unit_metrics(results.read(final_unit(dev, label, d, n, chosen[(label, d, n)])),
                                         d, [n], config)} for d, n in targets(config)]
    avg[label] = float(metrics.average_table(rows)["avg"])
    if m not in best or avg[label] > avg[best[m]]:
      best[m] = label
  return {"avg": avg, "chosen": best}


def edge_choices(config, chosen) -> dict[str, list[str]]:
  """Per row, the concepts ('domain/name') whose chosen gamma is the strongest
  or the mildest of the row's grid: for them the grid may be too narrow. A
  fixed setting (no sweep) is never at an edge."""
  rows = {v.label(m): (m, v) for m, v in arms(config)}
  out = {}
  for (label, d, n), s in sorted(chosen.items()):
    if label not in rows or fixed_setting(config, *rows[label], d) is not None:
      continue
    m, v = rows[label]
    g = v.gammas_of(m, config.evaluate.gammas)
    edge = out.setdefault(label, [])
    if len(g) > 1 and s.get("gamma") in (min(g), max(g)):
      edge.append(f"{d}/{n}")
  return out


def reported(config, chosen, rules: dict | None):
  """The choices of the rows the table reports: every row, or with a rule
  choice the papers' rule and each method's chosen row."""
  if not rules:
    return chosen
  keep = {m for m, v in arms(config) if not v.name} | set(rules["chosen"].values())
  return {k: s for k, s in chosen.items() if k[0] in keep}


def sequential_units(config, chosen) -> list[dict]:
  ev = config.evaluate
  order = list(ev.sequential_objects) or list(config.concepts.objects)
  for o in order:
    concepts.lookup(o, config.concepts.objects, "object")
  # Up to the whole order (the papers' 9-object point); IRA needs one object
  # kept, so an order of every object stops one short.
  kept = {o.lower() for o in config.concepts.objects} - {o.lower() for o in order}
  last = len(order) if kept else len(order) - 1
  out = []
  for m in ev.methods:
    if m == "none" or not ev.sequential:
      continue
    for n in range(1, last + 1):
      erase = [["object", o, chosen[(m, "object", o)]] for o in order[:n] if (m, "object", o) in chosen]
      out.append({"phase": "sequential", "method": m, "n": n, "objects": order[:n], "erase": erase,
                  "seeds": list(ev.eval_seeds)})
  return out


def uncertainty(config, answers: dict[str, list], rows: dict[str, dict],
                pair: tuple[str, str] = ("saemnesia", "saeuron")) -> dict:
  """The 95% intervals of Table 1 and the paired difference SAEmnesia - SAeUron
  (evaluation/intervals.py), from the final units' stored answers.

  ``answers``: {row label -> [(domain, concept name, unit result)]};
  ``rows``: the table ({row label -> average_table row}). Returns
  {'intervals': {label -> {key -> [lo, hi]}}, 'difference': {key -> {diff,
  lo, hi, se, seeds_needed}} or {} without both methods, 'n_boot', 'level',
  'eval_seeds'}.
  """
  objs, stys = list(config.concepts.objects), list(config.concepts.styles)
  boot = {m: [(d, [concepts.lookup(n, objs if d == "object" else stys, d)], r) for d, n, r in rs]
          for m, rs in answers.items()}
  reps = intervals.table_replicates(
      boot, len(objs), len(stys), cra_unstyled_only=protocol.value(config, "evaluate.style_cra") == "unstyled")
  n_seeds = len(config.evaluate.eval_seeds)
  diff = (intervals.paired_difference(reps, *pair, point=rows, n_now=n_seeds) if set(pair) <= set(rows) else {})
  return {"intervals": intervals.table_intervals(reps), "difference": diff, "pair": list(pair),
          "n_boot": intervals.N_BOOT, "level": intervals.LEVEL, "eval_seeds": n_seeds}
