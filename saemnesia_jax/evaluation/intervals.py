"""Uncertainty of Table 1: percentile bootstrap intervals over images (numpy only).

What is random in an evaluation is which images were drawn: each (prompt,
seed) pair is one image of the answer set. A bootstrap replicate resamples
those images with replacement *within each concept* (stratified: every
concept keeps its number of images, so every per-concept accuracy stays
defined) and recomputes every number of Table 1 exactly as the metrics do
(evaluation/metrics.py): per erased concept UA, IRA and CRA, then the mean
over the concepts of each domain, then ``avg``, the mean of the six.

* One draw of image positions per replicate is shared by every unit (every
  erased concept and every method): the units of one evaluation judge the
  same (prompt, seed) pairs, so the image at a position is "the same draw"
  everywhere. Object erasures use a draw stratified by the true object,
  style erasures one stratified by the true style (the unstyled images form
  their own stratum).
* Because the draw is shared, the difference between two methods is a
  *paired* bootstrap: both are recomputed on the same resampled images, and
  the interval of their difference is the percentile interval of the
  per-replicate differences (``paired_difference``).
* Intervals are percentile intervals (the 2.5th and 97.5th percentiles of
  the replicates for 95%); the seed of the draw is fixed (``SEED``), so the
  same units give the same intervals.

The intervals count image-level noise only: the concepts themselves are
fixed (they are the benchmark, not a sample), and so is the sweep's choice
of each concept's setting.

How many seeds would separate two methods: with a standard error ``se``
(the standard deviation of the bootstrap differences) from ``n_now`` seeds,
the standard error at n seeds is about ``se * sqrt(n_now / n)`` (independent
seeds), so the 95% interval excludes 0 when ``|diff| >= 1.96 se sqrt(n_now / n)``,
that is at ``n_needed = n_now * (1.96 * se / |diff|)^2`` (normal approximation;
``seeds_needed``). The same formula with the number of concepts in place of
seeds reads as concepts needed, where the standard error is over concepts.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from saemnesia_jax.evaluation.concepts import NO_STYLE

LEVEL = 0.95
N_BOOT = 1000  # replicates of every interval
SEED = 0  # the draw's seed: the same units give the same intervals
Z95 = 1.959963984540054  # the normal 97.5th percentile
TABLE1_KEYS = ("style_UA", "style_IRA", "style_CRA", "object_UA", "object_IRA", "object_CRA", "avg")


def percentile_interval(samples, level: float = LEVEL) -> tuple[float, float]:
  """The central ``level`` percentile interval of bootstrap replicates (NaNs left out)."""
  s = np.asarray(samples, np.float64)
  s = s[~np.isnan(s)]
  if not s.size:
    return (math.nan, math.nan)
  a = (1.0 - level) / 2.0
  lo, hi = np.percentile(s, [100 * a, 100 * (1 - a)])
  return float(lo), float(hi)


def stratified_indices(strata, n_boot: int, rng: np.random.Generator) -> np.ndarray:
  """(n_boot, N) positions: each replicate resamples, with replacement, the
  positions of every stratum among themselves, in place (position i draws a
  position of i's own stratum)."""
  strata = np.asarray(strata)
  idx = np.empty((n_boot, len(strata)), np.int64)
  for s in np.unique(strata):
    pos = np.flatnonzero(strata == s)
    idx[:, pos] = pos[rng.integers(0, len(pos), size=(n_boot, len(pos)))]
  return idx


def class_accuracy(correct, labels, idx, n_classes: int, keep=None) -> np.ndarray:
  """(B, n_classes) per-class accuracy of each replicate: the share of the
  resampled images of each true class (``labels``) that are ``correct``;
  NaN where a replicate holds no image of a class. ``keep`` (N,) bool: only
  those images count (a replicate's draw of a dropped image counts nowhere)."""
  b, n = idx.shape
  lab = np.asarray(labels)[idx]
  ok = np.asarray(correct, np.float64)[idx]
  w = np.ones_like(ok) if keep is None else np.asarray(keep, np.float64)[idx]
  valid = (lab >= 0) & (lab < n_classes)
  flat = (np.arange(b)[:, None] * n_classes + np.where(valid, lab, 0)).ravel()
  w = (w * valid).ravel()
  count = np.bincount(flat, weights=w, minlength=b * n_classes).reshape(b, n_classes)
  hits = np.bincount(flat, weights=w * ok.ravel(), minlength=b * n_classes).reshape(b, n_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, hits / np.maximum(count, 1), np.nan)


def _nanmean(a, axis=-1):
  a = np.asarray(a, np.float64)
  n = (~np.isnan(a)).sum(axis)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, np.nansum(a, axis) / np.maximum(n, 1), np.nan)


def replicate_metrics(answer: Mapping[str, Sequence[int]], domain: str, erased: Sequence[int], idx: np.ndarray,
                      n_objects: int, n_styles: int, cra_unstyled_only: bool = False,
                      cra_exclude_erased: bool = False) -> dict[str, np.ndarray]:
  """UA, IRA, CRA ((B,) arrays) of one answer set (a unit result: ``true_object``,
  ``true_style``, ``pred_object``, ``pred_style``) under each replicate's
  image positions ``idx``, as ``metrics.erasure_metrics`` computes them
  (the identity draw ``idx = arange(N)[None]`` gives exactly its numbers)."""
  t_obj, t_sty = np.asarray(answer["true_object"]), np.asarray(answer["true_style"])
  p_obj, p_sty = np.asarray(answer["pred_object"]), np.asarray(answer["pred_style"])
  if domain == "object":
    own = class_accuracy(p_obj == t_obj, t_obj, idx, n_objects)
    keep = ~np.isin(t_obj, erased) if cra_exclude_erased else None
    cross = class_accuracy(p_sty == t_sty, t_sty, idx, n_styles, keep)  # NO_STYLE (-1) left out
  else:
    own = class_accuracy(p_sty == t_sty, t_sty, idx, n_styles)
    keep = np.ones(len(t_obj), bool)
    if cra_exclude_erased:
      keep &= ~np.isin(t_sty, erased)
    if cra_unstyled_only:
      keep &= t_sty == NO_STYLE
    cross = class_accuracy(p_obj == t_obj, t_obj, idx, n_objects, keep)
  erased = list(erased)
  present = ~np.isnan(own)  # classes of the answer set (stratified: the same in every replicate)
  retained = [c for c in range(own.shape[1]) if c not in erased and present[:, c].all()]
  return {"UA": np.mean(1.0 - own[:, erased], axis=1),
          "IRA": _nanmean(own[:, retained]) if retained else np.full(len(idx), np.nan),
          "CRA": _nanmean(cross)}


def _check_same_images(answers: Sequence[Mapping]) -> None:
  first = answers[0]
  for a in answers[1:]:
    for k in ("true_object", "true_style"):
      if list(a[k]) != list(first[k]):
        raise ValueError("the bootstrap pairs units image by image, but two answer sets hold different images "
                         f"({k} differs): give units of the same prompts and seeds")


def table_replicates(rows: Mapping[str, Sequence[tuple[str, Sequence[int], Mapping]]], n_objects: int,
                     n_styles: int, n_boot: int = N_BOOT, seed: int = SEED,
                     cra_unstyled_only: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """{method -> {Table 1 key -> (n_boot,) replicates}}.

  ``rows``: {method -> one (domain, erased concept ids, answer set) per
  erased concept}. Every answer set must hold the same images (true labels
  in the same order); one draw per replicate serves every method
  (``paired_difference`` relies on it). A domain without concepts gives NaN.
  """
  answers = [a for rs in rows.values() for _, _, a in rs]
  if not answers:
    raise ValueError("table_replicates needs at least one answer set")
  _check_same_images(answers)
  rng = np.random.default_rng(seed)
  draws = {"object": stratified_indices(answers[0]["true_object"], n_boot, rng),
           "style": stratified_indices(answers[0]["true_style"], n_boot, rng)}
  out = {}
  for method, rs in rows.items():
    per = {f"{d}_{m}": [] for d in ("style", "object") for m in ("UA", "IRA", "CRA")}
    for domain, erased, answer in rs:
      met = replicate_metrics(answer, domain, erased, draws[domain], n_objects, n_styles,
                              cra_unstyled_only=cra_unstyled_only and domain == "style")
      for m, v in met.items():
        per[f"{domain}_{m}"].append(v)
    cols = {k: np.mean(v, axis=0) if v else np.full(n_boot, np.nan) for k, v in per.items()}
    cols["avg"] = np.mean([cols[k] for k in TABLE1_KEYS[:6]], axis=0)
    out[method] = cols
  return out


def table_intervals(reps: Mapping[str, Mapping[str, np.ndarray]], level: float = LEVEL) -> dict:
  """{method -> {key -> [lo, hi]}} of ``table_replicates``' output."""
  return {m: {k: list(percentile_interval(v, level)) for k, v in cols.items()} for m, cols in reps.items()}


def seeds_needed(n_now: int, se: float, diff: float, z: float = Z95) -> float:
  """Seeds (or concepts, with a standard error over concepts) at which a
  difference ``diff`` with standard error ``se`` at ``n_now`` would have a
  95% interval that excludes 0: ``n_now * (z * se / |diff|)^2`` (module
  docstring); inf for no difference, 0 for no spread."""
  if not np.isfinite(diff) or not np.isfinite(se):
    return math.nan
  if diff == 0:
    return math.inf
  return float(n_now * (z * se / abs(diff)) ** 2)


def paired_difference(reps: Mapping[str, Mapping[str, np.ndarray]], a: str, b: str,
                      point: Mapping[str, Mapping[str, float]] | None = None, n_now: int = 1,
                      level: float = LEVEL) -> dict[str, dict[str, float]]:
  """{key -> {diff, lo, hi, se, seeds_needed}} of method ``a`` minus method ``b``.

  ``diff``: the difference of ``point`` (the table's rows, {method -> {key ->
  value}}) where given, else of the replicates' means; ``lo``/``hi``: the
  percentile interval of the per-replicate differences (the same resampled
  images for both: paired); ``se``: their standard deviation;
  ``seeds_needed``: ``seeds_needed(n_now, se, diff)``.
  """
  out = {}
  for k in reps[a]:
    d = np.asarray(reps[a][k]) - np.asarray(reps[b][k])
    finite = d[~np.isnan(d)]
    diff = (float(point[a][k]) - float(point[b][k])) if point is not None else \
        (float(finite.mean()) if finite.size else math.nan)
    se = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    lo, hi = percentile_interval(d, level)
    out[k] = {"diff": diff, "lo": lo, "hi": hi, "se": se, "seeds_needed": seeds_needed(n_now, se, diff)}
  return out


def proportion_interval(outcomes, n_boot: int = N_BOOT, seed: int = SEED,
                        level: float = LEVEL) -> tuple[float, float, float]:
  """(share, lo, hi): the share of true ``outcomes`` (e.g. attack successes,
  one per image) and its percentile bootstrap interval over the images."""
  x = np.asarray(outcomes, np.float64).ravel()
  if not x.size:
    return (math.nan, math.nan, math.nan)
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1)
  return (float(x.mean()), *percentile_interval(means, level))


def grouped_interval(groups: Sequence, n_boot: int = N_BOOT, seed: int = SEED,
                     level: float = LEVEL) -> tuple[float, float, float]:
  """(mean, lo, hi): the mean over groups (e.g. erased concepts) of each group's
  share of true outcomes, and its percentile bootstrap interval, resampling
  outcomes within each group (the table's stratified draw)."""
  groups = [np.asarray(g, np.float64).ravel() for g in groups if len(g)]
  if not groups:
    return (math.nan, math.nan, math.nan)
  rng = np.random.default_rng(seed)
  means = np.mean([g[rng.integers(0, len(g), size=(n_boot, len(g)))].mean(1) for g in groups], axis=0)
  return (float(np.mean([g.mean() for g in groups])), *percentile_interval(means, level))


def paired_grouped_difference(a: Sequence, b: Sequence, n_boot: int = N_BOOT, seed: int = SEED,
                              level: float = LEVEL) -> tuple[float, float, float]:
  """(diff, lo, hi): ``grouped_interval``'s mean of ``a`` minus that of ``b``, where
  a[i] and b[i] are outcomes on the same images of group i (one concept's prompts
  x seeds under two methods): one draw of image indices per group serves both."""
  pairs = [(np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()) for x, y in zip(a, b)]
  if not pairs or any(x.size != y.size or not x.size for x, y in pairs):
    raise ValueError("paired_grouped_difference: each group needs the same, non-zero number of images on both sides")
  rng = np.random.default_rng(seed)
  diffs = []
  for x, y in pairs:
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    diffs.append(x[idx].mean(1) - y[idx].mean(1))
  return (float(np.mean([x.mean() - y.mean() for x, y in pairs])), *percentile_interval(np.mean(diffs, axis=0), level))


def fmt(value: float, interval: Sequence[float] | None = None, digits: int = 2) -> str:
  """'95.98 [94.10, 97.60]': a fraction and its interval in percent."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  s = f"{100 * value:.{digits}f}"
  if interval is not None and not any(v is None or math.isnan(v) for v in interval):
    s += f" [{100 * interval[0]:.{digits - 1}f}, {100 * interval[1]:.{digits - 1}f}]"
  return s


def format_difference(diffs: Mapping[str, Mapping[str, float]], a: str, b: str, unit: str = "seeds") -> str:
  """A Markdown table of ``paired_difference``: one row per Table 1 key."""
  lines = [f"| {a} - {b} | difference (points) | 95% interval (paired) | SE | {unit} needed to separate |",
           "|---|---|---|---|---|"]
  for k, r in diffs.items():
    need = math.nan if r["seeds_needed"] is None else r["seeds_needed"]  # null in a summary.json read back
    need_s = "n/a" if math.isnan(need) else ("never (no difference)" if math.isinf(need) else f"{math.ceil(need)}")
    if r["lo"] is not None and r["hi"] is not None and not math.isnan(r["lo"]) and (r["lo"] > 0 or r["hi"] < 0):
      need_s += " (separated now)"
    pts = {f: "n/a" if r[f] is None or math.isnan(r[f]) else f"{100 * r[f]:+.2f}" for f in ("diff", "lo", "hi", "se")}
    lines.append(f"| {k} | {pts['diff']} | [{pts['lo']}, {pts['hi']}] | {pts['se'].lstrip('+')} | {need_s} |")
  return "\n".join(lines) + "\n"


def difference_text(unc: dict) -> str:
  """The paired difference SAEmnesia - SAeUron as Markdown ('' without both methods)."""
  if not unc.get("difference"):
    return ""
  return (f"Paired bootstrap over the same images ({unc['n_boot']} replicates, {unc['eval_seeds']} held-out "
          "seeds now; seeds needed: normal approximation, evaluation/intervals.py):\n\n"
          + format_difference(unc["difference"], *unc.get("pair", ("saemnesia", "saeuron"))))
