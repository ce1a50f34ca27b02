"""UnlearnCanvas metrics (docs/method.md section 6): UA, IRA, CRA and the tables.

Inputs are plain numpy arrays over the *answer set* of one erasure experiment:
the images generated for every object x style prompt (several seeds each),
with, per image, the true object id, the true style id, and the ids predicted
by the object and the style classifier. Ids are positions in the config's
``concepts.objects`` / ``concepts.styles``; a true style of ``NO_STYLE`` (-1,
an anchor prompt) is allowed and is left out of every style accuracy (the
style classifier's "no style" class is not a style that can be erased or
retained). Object accuracies use every image, anchors included.

Definitions (erased object c*; the style case is the mirror image):

* UA  (unlearning accuracy) = 1 - acc_obj(c*), where acc_obj(c) is the share
  of the images whose true object is c that the object classifier labels c.
  Images: those of c*, in every style.
* IRA (in-domain retain accuracy) = mean over the *other* objects c of
  acc_obj(c): the mean of per-object accuracies, not one accuracy pooled over
  their images, so that every retained concept weighs the same even when the
  answer set is not a full grid. Images: those of every object but c*.
* CRA (cross-domain retain accuracy) = mean over the styles s present of
  acc_sty(s), the style classifier's accuracy on the images whose true style
  is s. Images: all styled images of the answer set, those of c* included
  (the erasure must not damage the other domain anywhere); pass
  ``cra_exclude_erased=True`` to use only the images of the retained objects.

For a style erasure: UA on the erased style's images by the style classifier,
IRA over the other styles by the style classifier, CRA = mean per-object
accuracy of the object classifier over all images. Several concepts erased at
once (sequential unlearning): UA = mean over the erased concepts of
(1 - acc(c)), IRA = mean over the non-erased concepts, CRA as above.

Units: every metric is a fraction in [0, 1] internally and in every returned
dict or JSON; only the tables and figures print percent (two decimals).
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from saemnesia_jax.evaluation.concepts import NO_STYLE
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_bytes

DOMAINS = ("object", "style")
METRICS = ("UA", "IRA", "CRA")
# Table 1 of SAEmnesia: keys of ``average_table``'s dict, in column order.
TABLE1_KEYS = ("style_UA", "style_IRA", "style_CRA", "object_UA", "object_IRA", "object_CRA", "avg")
# Printed header of Table 1, as in docs/method.md section 6.
TABLE1_HEADER = ("style UA", "IRA", "CRA", "object UA", "IRA", "CRA", "avg")

# Published Table 1 of SAEmnesia (docs/method.md section 6), as fractions; the six
# numbers are style UA, IRA, CRA, object UA, IRA, CRA. The paper's SAeUron avg
# (90.10) is not the mean of its six numbers (90.195); ``table1_rows``
# recomputes avg, so this row prints 90.19 (the float mean is 90.19499...).
PUBLISHED_TABLE1 = {
    "ESD": (0.9858, 0.8097, 0.9396, 0.9215, 0.5578, 0.4423),
    "SalUn": (0.8626, 0.9039, 0.9508, 0.8691, 0.9635, 0.9959),
    "SAeUron": (0.9580, 0.9910, 0.9940, 0.8716, 0.8557, 0.7414),
    "SAEmnesia": (0.9660, 0.9867, 0.9930, 0.9465, 0.9139, 0.8848),
}


class MetricsError(UserError):
  """Bad input to a metric: unknown concept, mismatched arrays, empty set."""


# ----------------------------------------------------------------- accuracy


def _labels(name: str, a: Any, n: int | None = None) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim != 1:
    raise MetricsError(f"{name} must be a 1-D array of ids, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    if not np.all(np.equal(np.mod(a, 1), 0)):
      raise MetricsError(f"{name} must hold integer ids, got dtype {a.dtype}")
  a = a.astype(np.int64)
  if n is not None and a.shape[0] != n:
    raise MetricsError(f"{name} has {a.shape[0]} entries but true_obj has {n}: one entry per image")
  return a


def check_answer_set(true_obj: Any, true_sty: Any, pred_obj: Any, pred_sty: Any,
                     object_names: Sequence[str] | None = None,
                     style_names: Sequence[str] | None = None) -> tuple[np.ndarray, ...]:
  """The four label arrays as int64, checked: 1-D, one entry per image, true
  objects >= 0, true styles >= NO_STYLE, and within the name lists if given."""
  t_obj = _labels("true_obj", true_obj)
  n = t_obj.shape[0]
  if n == 0:
    raise MetricsError("the answer set is empty: pass the labels of at least one generated image")
  t_sty, p_obj, p_sty = (_labels(k, v, n) for k, v in
                         (("true_sty", true_sty), ("pred_obj", pred_obj), ("pred_sty", pred_sty)))
  if t_obj.min() < 0:
    raise MetricsError(f"true_obj holds negative ids ({t_obj.min()}): object ids start at 0")
  if t_sty.min() < NO_STYLE:
    raise MetricsError(f"true_sty holds ids below NO_STYLE={NO_STYLE} ({t_sty.min()})")
  if object_names is not None and t_obj.max() >= len(object_names):
    raise MetricsError(f"true_obj holds id {t_obj.max()} but only {len(object_names)} objects are named")
  if style_names is not None and t_sty.max() >= len(style_names):
    raise MetricsError(f"true_sty holds id {t_sty.max()} but only {len(style_names)} styles are named")
  return t_obj, t_sty, p_obj, p_sty


def per_class_accuracy(true: Any, pred: Any, ignore: Sequence[int] = ()) -> dict[int, float]:
  """{class id -> share of the images of that class predicted as it}, for
  every class present in ``true`` and not in ``ignore``; fractions in [0, 1]."""
  true, pred = np.asarray(true), np.asarray(pred)
  out = {}
  for c in np.unique(true):
    if int(c) in ignore:
      continue
    sel = true == c
    out[int(c)] = float(np.mean(pred[sel] == c))
  return out


# ------------------------------------------------------------------ metrics


def _describe(ids: Sequence[int], names: Sequence[str] | None) -> str:
  return ", ".join(f"{i} ({names[i]})" if names is not None else str(i) for i in ids)


def _resolve(concept: int | str, domain: str, present: Sequence[int],
             names: Sequence[str] | None) -> int:
  """Id of an erased concept (an id or, with ``names``, a case-insensitive
  name), checked to be in range and present in the answer set."""
  known = (f"known {domain}s: {_describe(range(len(names)), names)}" if names is not None
           else f"{domain} ids in the answer set: {_describe(present, None)}")
  if isinstance(concept, str):
    if names is None:
      raise MetricsError(f"erased {domain} {concept!r} is a name: pass {domain}_names to resolve it, or "
                         f"an id; {known}")
    low = [n.lower() for n in names]
    if concept.lower() not in low:
      raise MetricsError(f"unknown erased {domain} {concept!r}; {known}")
    cid = low.index(concept.lower())
  elif isinstance(concept, (int, np.integer)) and not isinstance(concept, bool):
    cid = int(concept)
    hi = len(names) if names is not None else None
    if cid < 0 or (hi is not None and cid >= hi):
      raise MetricsError(f"erased {domain} id {cid} is out of range; {known}")
  else:
    raise MetricsError(f"erased {domain} must be an int id or a name, got {type(concept).__name__}")
  if cid not in present:
    label = f"{cid} ({names[cid]})" if names is not None else str(cid)
    raise MetricsError(f"erased {domain} {label} has no images in the answer set; {domain}s present: "
                       f"{_describe(present, names)}")
  return cid


def erasure_metrics(true_obj: Any, true_sty: Any, pred_obj: Any, pred_sty: Any,
                    erased: Sequence[int | str], domain: str, *,
                    object_names: Sequence[str] | None = None, style_names: Sequence[str] | None = None,
                    cra_exclude_erased: bool = False, cra_unstyled_only: bool = False) -> dict[str, float]:
  """UA, IRA, CRA (fractions in [0, 1]) for the concepts ``erased`` of
  ``domain`` ('object' or 'style') all erased at once; the definitions and
  which images each metric uses are in the module docstring.

  ``cra_unstyled_only`` (a style erasure): CRA is the object accuracy on the
  unstyled (NO_STYLE) images only, as SAeUron's released accuracy script
  counts it (``evaluate.style_cra=unstyled``); the styled images never enter it.

  ``erased`` holds ids or (with the matching ``*_names``) names. An erased
  concept out of range or without images in the answer set is a MetricsError
  (a ValueError) naming it and the known concepts.
  """
  if domain not in DOMAINS:
    raise MetricsError(f"domain={domain!r}; expected one of {DOMAINS}")
  t_obj, t_sty, p_obj, p_sty = check_answer_set(true_obj, true_sty, pred_obj, pred_sty,
                                                object_names, style_names)
  if isinstance(erased, (str, int, np.integer)):
    erased = [erased]
  if len(erased) == 0:
    raise MetricsError(f"no erased {domain} given: name at least one")
  if domain == "object":
    (t_in, p_in, names, ignore), (t_x, p_x, ignore_x) = (t_obj, p_obj, object_names, ()), (t_sty, p_sty, (NO_STYLE,))
  else:
    (t_in, p_in, names, ignore), (t_x, p_x, ignore_x) = (t_sty, p_sty, style_names, (NO_STYLE,)), (t_obj, p_obj, ())
  acc = per_class_accuracy(t_in, p_in, ignore)
  ids = [_resolve(c, domain, sorted(acc), names) for c in erased]
  if len(set(ids)) != len(ids):
    raise MetricsError(f"erased {domain}s repeat a concept: {_describe(ids, names)}")
  retained = [c for c in sorted(acc) if c not in ids]
  if not retained:
    raise MetricsError(f"every {domain} in the answer set is erased ({_describe(ids, names)}): IRA needs "
                       f"images of at least one retained {domain}")
  keep = ~np.isin(t_in, ids) if cra_exclude_erased else np.ones_like(t_in, dtype=bool)
  if cra_unstyled_only and domain == "style":
    keep &= t_sty == NO_STYLE
  acc_x = per_class_accuracy(t_x[keep], p_x[keep], ignore_x)
  if not acc_x:
    other = "style" if domain == "object" else "object"
    if cra_unstyled_only and domain == "style":
      raise MetricsError("no unstyled images for CRA (evaluate.style_cra=unstyled): the answer set must hold "
                         "each object's unstyled prompt (evaluate.seed_images=True)")
    raise MetricsError(f"no images with a true {other} for CRA (all NO_STYLE?): the answer set must "
                       f"hold styled prompts")
  return {"UA": float(np.mean([1.0 - acc[c] for c in ids])),
          "IRA": float(np.mean([acc[c] for c in retained])),
          "CRA": float(np.mean(list(acc_x.values())))}


def object_erasure_metrics(true_obj: Any, true_sty: Any, pred_obj: Any, pred_sty: Any,
                           erased_object: int | str, **kwargs) -> dict[str, float]:
  """UA, IRA, CRA (fractions) for one erased object: UA on its images by the
  object classifier, IRA over the other objects, CRA = style accuracy."""
  return erasure_metrics(true_obj, true_sty, pred_obj, pred_sty, [erased_object], "object", **kwargs)


def style_erasure_metrics(true_obj: Any, true_sty: Any, pred_obj: Any, pred_sty: Any,
                          erased_style: int | str, **kwargs) -> dict[str, float]:
  """UA, IRA, CRA (fractions) for one erased style: UA on its images by the
  style classifier, IRA over the other styles, CRA = object accuracy."""
  return erasure_metrics(true_obj, true_sty, pred_obj, pred_sty, [erased_style], "style", **kwargs)


def sequential_metrics(true_obj: Any, true_sty: Any, pred_obj: Any, pred_sty: Any,
                       erased: Sequence[int | str], domain: str = "object", **kwargs) -> dict[str, float]:
  """Several concepts erased at once: UA = mean over ``erased`` of
  (1 - acc(c)), IRA = mean per-concept accuracy over the non-erased ones of
  the same domain, CRA = mean per-class accuracy of the other domain."""
  return erasure_metrics(true_obj, true_sty, pred_obj, pred_sty, list(erased), domain, **kwargs)


def sweep_score(metrics: Mapping[str, float]) -> float:
  """(UA + IRA) / 2: the criterion by which the hyperparameter sweep picks a
  setting per concept (docs/method.md section 5)."""
  return (float(metrics["UA"]) + float(metrics["IRA"])) / 2.0


# ------------------------------------------------------------------- tables


def _check_fraction(name: str, v: Any) -> float:
  v = float(v)
  if not (math.isnan(v) or 0.0 <= v <= 1.0):
    raise MetricsError(f"{name}={v} is not a fraction in [0, 1] (metrics are fractions; tables print %)")
  return v


def average_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Averages per-concept results into one Table 1 row.

  ``rows``: one mapping per erased concept with ``domain`` ('object' or
  'style') and ``UA``, ``IRA``, ``CRA`` (fractions; other keys ignored).
  Returns {``TABLE1_KEYS`` -> fraction}: the mean of each metric over the
  concepts of each domain, NaN for a domain without rows, and ``avg`` = the
  mean of the six (NaN unless both domains are present).
  """
  if not rows:
    raise MetricsError("average_table needs at least one per-concept result")
  sums = {k: [] for k in TABLE1_KEYS[:6]}
  for i, r in enumerate(rows):
    dom = r.get("domain")
    if dom not in DOMAINS:
      raise MetricsError(f"row {i} has domain={dom!r}; expected one of {DOMAINS}")
    for m in METRICS:
      if m not in r:
        raise MetricsError(f"row {i} ({dom}) has no {m}: each row needs UA, IRA and CRA")
      sums[f"{dom}_{m}"].append(_check_fraction(f"row {i} {m}", r[m]))
  out = {k: float(np.mean(v)) if v else math.nan for k, v in sums.items()}
  out["avg"] = float(np.mean([out[k] for k in TABLE1_KEYS[:6]]))
  return out


def table1_rows(rows: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
  """{method -> six fractions (style UA, IRA, CRA, object UA, IRA, CRA) or an
  ``average_table`` dict} -> {method -> the six plus avg (their mean)}."""
  out = {}
  for method, r in rows.items():
    six = [r[k] for k in TABLE1_KEYS[:6]] if isinstance(r, Mapping) else list(r)
    if len(six) != 6:
      raise MetricsError(f"row {method!r} has {len(six)} numbers; Table 1 needs six: style UA, IRA, CRA, "
                         f"object UA, IRA, CRA")
    six = [_check_fraction(f"{method} {h}", v) for h, v in zip(TABLE1_KEYS, six)]
    out[method] = (*six, float(np.mean(six)))
  return out


def _pct(v: float) -> str:
  return "n/a" if math.isnan(v) else f"{100.0 * v:.2f}"


def _table(rows: Mapping[str, Any], columns: Sequence[str] | None) -> tuple[list[str], dict[str, tuple]]:
  if columns is None:
    return list(TABLE1_HEADER), table1_rows(rows)
  out = {}
  for method, r in rows.items():
    vals = [r[c] for c in columns] if isinstance(r, Mapping) else list(r)
    if len(vals) != len(columns):
      raise MetricsError(f"row {method!r} has {len(vals)} numbers for {len(columns)} columns {list(columns)}")
    out[method] = tuple(_check_fraction(f"{method} {c}", v) for c, v in zip(columns, vals))
  return list(columns), out


def _cell(v: float, iv: Sequence[float] | None) -> str:
  """'95.98' or, with a 95% interval (fractions), '95.98 [94.1, 97.6]'."""
  if iv is None or any(x is None or math.isnan(x) for x in iv) or math.isnan(v):
    return _pct(v)
  return f"{_pct(v)} [{100.0 * iv[0]:.1f}, {100.0 * iv[1]:.1f}]"


def format_markdown(rows: Mapping[str, Any], columns: Sequence[str] | None = None,
                    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> str:
  """A Markdown table, one line per method, numbers in percent (2 decimals).

  ``columns=None``: Table 1 (six numbers per method, avg appended, header as
  in docs/method.md). Otherwise the named columns, e.g. ``("UA", "IRA", "CRA")``
  for sequential unlearning, each row a mapping or a sequence of fractions.
  ``intervals``: {method -> {key -> [lo, hi]}} (fractions; evaluation/intervals.py):
  each number is followed by its 95% interval, e.g. ``95.98 [94.1, 97.6]``.
  """
  header, table = _table(rows, columns)
  keys = list(TABLE1_KEYS) if columns is None else list(columns)
  lines = ["| method | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
  lines += [f"| {m} | " + " | ".join(_cell(v, (intervals or {}).get(m, {}).get(k)) for k, v in zip(keys, vals))
            + " |" for m, vals in table.items()]
  return "\n".join(lines) + "\n"


def format_csv(rows: Mapping[str, Any], columns: Sequence[str] | None = None,
               intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> str:
  """The same table as CSV: a ``method`` column, then one column per metric
  (Table 1: ``TABLE1_KEYS``), in percent with two decimals, empty for NaN;
  with ``intervals``, then ``<key>_lo`` and ``<key>_hi`` per metric."""
  _, table = _table(rows, columns)
  keys = list(TABLE1_KEYS) if columns is None else list(columns)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  pct = lambda v: "" if v is None or math.isnan(v) else f"{100.0 * v:.2f}"  # noqa: E731
  w.writerow(["method"] + keys + ([f"{k}_{e}" for k in keys for e in ("lo", "hi")] if intervals else []))
  for m, vals in table.items():
    extra = [pct(x) for k in keys for x in (intervals.get(m, {}).get(k) or (None, None))] if intervals else []
    w.writerow([m] + [pct(v) for v in vals] + extra)
  return buf.getvalue()


def write_table(path_stem: str, rows: Mapping[str, Any], columns: Sequence[str] | None = None,
                title: str = "", intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                footer: str = "") -> tuple[str, str]:
  """Writes ``path_stem.md`` and ``path_stem.csv`` atomically; returns both
  paths. ``title``, if given, heads the Markdown file; ``footer`` ends it;
  ``intervals`` as ``format_markdown`` takes them."""
  md = (f"{title}\n\n" if title else "") + format_markdown(rows, columns, intervals) + \
      (f"\n{footer}" if footer else "")
  paths = (path_stem + ".md", path_stem + ".csv")
  atomic_write_bytes(paths[0], md.encode())
  atomic_write_bytes(paths[1], format_csv(rows, columns, intervals).encode())
  return paths


# ------------------------------------------------------------------ figures


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  return buf.getvalue()


def plot_table(path: str, rows: Mapping[str, Any], columns: Sequence[str] | None = None,
               title: str = "") -> str:
  """A grouped bar chart of a table (one group per column, one bar per
  method, percent); written atomically as PNG. Returns ``path``."""
  from matplotlib.figure import Figure  # deferred: matplotlib only to plot (the checks import this module)
  header, table = _table(rows, columns)
  labels = list(TABLE1_KEYS) if columns is None else header
  n_m = max(len(table), 1)
  width = 0.8 / n_m
  fig = Figure(figsize=(max(6.0, 1.1 * len(labels) + 1), 3.8))
  ax = fig.subplots()
  x = np.arange(len(labels))
  for i, (m, vals) in enumerate(table.items()):
    ax.bar(x - 0.4 + width * (i + 0.5), [100.0 * v for v in vals], width, label=m)
  ax.set_xticks(x, [lab.replace("_", " ") for lab in labels], fontsize=8)
  ax.set_ylim(0, 105)
  ax.set_ylabel("%")
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  if title:
    ax.set_title(title, fontsize=9)
  atomic_write_bytes(path, _png(fig))
  return path


def plot_sweep(path: str, gammas: Sequence[float], curves: Mapping[str, Sequence[Mapping[str, float]]],
               title: str = "") -> str:
  """UA, IRA, CRA (percent) against the multiplier gamma, one line style per
  curve (e.g. per method or concept), one colour per metric; PNG, atomic.

  ``curves``: {label -> one metrics dict per gamma, in the order of ``gammas``}.
  """
  from matplotlib.figure import Figure  # deferred: matplotlib only to plot (the checks import this module)
  if not curves:
    raise MetricsError("plot_sweep needs at least one curve")
  for label, ms in curves.items():
    if len(ms) != len(gammas):
      raise MetricsError(f"curve {label!r} has {len(ms)} points for {len(gammas)} gammas")
  fig = Figure(figsize=(6.5, 4.0))
  ax = fig.subplots()
  styles = ["-", "--", ":", "-."]
  colours = {"UA": "tab:red", "IRA": "tab:blue", "CRA": "tab:green"}
  for j, (label, ms) in enumerate(curves.items()):
    for m in METRICS:
      ax.plot(gammas, [100.0 * _check_fraction(f"{label} {m}", p[m]) for p in ms], styles[j % len(styles)],
              marker="o", ms=3, color=colours[m], label=f"{label} {m}")
  ax.set_xlabel("gamma (clamp multiplier)")
  ax.set_ylabel("%")
  ax.set_ylim(0, 105)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=max(1, len(curves)), loc="lower left")
  if title:
    ax.set_title(title, fontsize=9)
  atomic_write_bytes(path, _png(fig))
  return path


def plot_sequential(path: str, seq_rows: Mapping[str, Sequence[Mapping[str, float]]]) -> None:
  """Sequential unlearning: UA / IRA / CRA against the number of objects erased at once."""
  from matplotlib.figure import Figure  # deferred: matplotlib only to plot (the checks import this module)
  fig = Figure(figsize=(11, 3.2))
  axes = fig.subplots(1, 3)
  for ax, key in zip(axes, ("UA", "IRA", "CRA")):
    for m, rs in seq_rows.items():
      ax.plot([r["n"] for r in rs], [100 * r[key] for r in rs], marker="o", label=m)
    ax.set_xlabel("objects erased at once")
    ax.set_ylabel(f"{key} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("Sequential unlearning")
  fig.tight_layout()
  atomic_write_bytes(path, _png(fig))
