"""The concept-latent association report of the ``scores`` stage, and its plots.

For each concept, how much of its positive importance-score mass sits in its
best latent and how many latents it takes to reach ``mass_fraction`` (90%)
of it. The mass of latent i for concept c is ``AGGREGATION``: the mean over
steps t of max(s(i, t, c), 0), so a latent specific to c at some steps
counts, and negative scores (latents more active for the other concepts) do
not cancel it. For a supervised SAE the report also gives the share held by
the *assigned* latent, its rank, and whether it is the best one: the
measure of the paper's claim that supervised training concentrates each
concept in one latent, where unsupervised training splits it.

``association_report`` builds it (JSON-able), ``format_report`` prints it,
``plot_report`` draws one SAE's and ``compare_reports`` two SAEs' side by side.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from saemnesia_jax.evaluation.metrics import _png
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import atomic_write_bytes, read_json
from saemnesia_jax.sae import importance as imp

AGGREGATION = "mean over steps of max(score, 0)"


class AssociationError(UserError):
  pass


# --------------------------------------------------------------------------
# Association report


def score_mass(scores: np.ndarray) -> np.ndarray:
  """(C, L): each latent's score mass for each concept, ``AGGREGATION`` of (C, S, L) scores."""
  return np.maximum(np.asarray(scores, np.float64), 0.0).mean(axis=1)


def _curve_points(n_latents: int, n_points: int = 200) -> np.ndarray:
  return np.unique(np.round(np.logspace(0, np.log10(n_latents), n_points)).astype(np.int64))


def association_report(scores_objects: np.ndarray, scores_styles: np.ndarray, objects: Sequence[str],
                       styles: Sequence[str], assignment: np.ndarray | None = None,
                       mass_fraction: float = 0.9) -> dict[str, Any]:
  """How concentrated each concept's importance-score mass is (JSON-able).

  Args:
    scores_objects, scores_styles: (C, S, L) importance scores per domain.
    objects, styles: concept names.
    assignment: (n_obj + n_sty,) latent ids of a supervised SAE (objects
      first), or None.
    mass_fraction: share of mass to reach for ``n_latents_to_mass``.
  Returns ``{"aggregation", "mass_fraction", "n_latents", "supervised",
  "domains": {"objects"|"styles": {"concepts": [...], summary means, "curve":
  {"n", "mass"}}}}``. Per concept: best_latent, top1_share,
  n_latents_to_mass (from ``importance.association_report`` on
  ``score_mass``), mass (total positive mass), and with an assignment:
  assigned_latent, assigned_share, assigned_rank (1 = the best latent),
  assigned_is_best. ``curve``: mean over the domain's concepts (those with
  mass) of the share of mass held by the n best latents, at log-spaced n.
  """
  n_obj, n_sty = len(objects), len(styles)
  n_latents = int(np.shape(scores_objects)[-1])
  if assignment is not None:
    assignment = np.asarray(assignment, np.int64)
    if assignment.shape != (n_obj + n_sty,) or assignment.min(initial=0) < 0 or \
        assignment.max(initial=0) >= n_latents:
      raise AssociationError(f"the assignment must hold {n_obj + n_sty} latent ids in [0, {n_latents}) "
                        f"({n_obj} objects then {n_sty} styles), got {assignment.tolist()}")
  points = _curve_points(n_latents)
  report: dict[str, Any] = {"aggregation": AGGREGATION, "mass_fraction": float(mass_fraction),
                            "n_latents": n_latents, "supervised": assignment is not None, "domains": {}}
  for dom, scores, names, offset in (("objects", scores_objects, objects, 0),
                                     ("styles", scores_styles, styles, n_obj)):
    names = list(names)
    if np.shape(scores)[0] != len(names):
      raise AssociationError(f"{dom}: {np.shape(scores)[0]} score rows for {len(names)} names")
    entry: dict[str, Any] = {"concepts": [], "n_concepts": len(names)}
    report["domains"][dom] = entry
    if not names:
      continue
    mass = score_mass(scores)  # (C, L)
    r = {key: np.asarray(v) for key, v in imp.association_report(
        jnp.asarray(mass, jnp.float32), mass_fraction).items()}
    total = mass.sum(axis=1)
    order = np.argsort(-mass, axis=1, kind="stable")
    for c, name in enumerate(names):
      row = {"name": name, "best_latent": int(r["best_latent"][c]), "top1_share": float(r["top1_share"][c]),
             "n_latents_to_mass": int(r["n_latents_to_mass"][c]), "mass": float(total[c])}
      if assignment is not None:
        a = int(assignment[offset + c])
        share = float(mass[c, a] / total[c]) if total[c] > 0 else 0.0
        rank = int(np.flatnonzero(order[c] == a)[0]) + 1
        row.update(assigned_latent=a, assigned_share=share, assigned_rank=rank,
                   assigned_is_best=bool(total[c] > 0 and mass[c, a] >= mass[c].max()))
      entry["concepts"].append(row)
    has = total > 0
    cum = np.cumsum(np.take_along_axis(mass, order, axis=1), axis=1)[has] / total[has][:, None]
    entry["curve"] = {"n": points.tolist(),
                      "mass": (cum.mean(axis=0)[points - 1] if has.any() else np.zeros(len(points))).tolist()}
    rows = entry["concepts"]
    entry["mean_top1_share"] = float(np.mean([q["top1_share"] for q in rows]))
    entry["mean_n_latents_to_mass"] = float(np.mean([q["n_latents_to_mass"] for q in rows]))
    entry["median_n_latents_to_mass"] = float(np.median([q["n_latents_to_mass"] for q in rows]))
    entry["n_without_mass"] = int((~has).sum())
    if assignment is not None:
      entry["mean_assigned_share"] = float(np.mean([q["assigned_share"] for q in rows]))
      entry["assigned_is_best_count"] = int(sum(q["assigned_is_best"] for q in rows))
  return report


def format_report(report: Mapping[str, Any], title: str = "") -> str:
  """The report as a printable table plus the means per domain."""
  sup = report["supervised"]
  pct = f"{100 * report['mass_fraction']:g}%"
  head = f"{'domain':8s} {'concept':22s} {'best':>7s} {'top-1':>6s} {'to ' + pct:>7s}"
  if sup:
    head += f" {'assigned':>8s} {'share':>6s} {'rank':>5s} {'best?':>5s}"
  lines = ([title] if title else []) + [f"score mass per latent: {report['aggregation']}", head]
  for dom, entry in report["domains"].items():
    for q in entry["concepts"]:
      line = (f"{dom[:-1]:8s} {q['name'][:22]:22s} {q['best_latent']:7d} {q['top1_share']:6.3f} "
              f"{q['n_latents_to_mass']:7d}")
      if sup:
        line += (f" {q['assigned_latent']:8d} {q['assigned_share']:6.3f} {q['assigned_rank']:5d} "
                 f"{'yes' if q['assigned_is_best'] else 'NO':>5s}")
      lines.append(line)
  for dom, entry in report["domains"].items():
    if not entry["concepts"]:
      continue
    line = (f"{dom}: mean top-1 share {entry['mean_top1_share']:.3f}, latents to {pct}: mean "
            f"{entry['mean_n_latents_to_mass']:.1f}, median {entry['median_n_latents_to_mass']:.0f}")
    if sup:
      line += (f"; assigned share {entry['mean_assigned_share']:.3f}, assigned is best "
               f"{entry['assigned_is_best_count']}/{entry['n_concepts']}")
    lines.append(line)
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Plots


_COLOURS = {"objects": "tab:blue", "styles": "tab:orange"}


def _concept_rows(report: Mapping[str, Any]) -> list[tuple[str, dict]]:
  return [(dom, q) for dom, entry in report["domains"].items() for q in entry["concepts"]]


def _curve_panel(ax, report: Mapping[str, Any], label: str = "", linestyle: str = "-",
                 colours: Mapping[str, str] | None = None) -> None:
  for dom, entry in report["domains"].items():
    if entry.get("curve"):
      colour = (colours or _COLOURS)[dom]
      ax.plot(entry["curve"]["n"], entry["curve"]["mass"], linestyle, color=colour,
              label=f"{label + ' ' if label else ''}{dom} ({entry['n_concepts']})")
  ax.axhline(report["mass_fraction"], color="grey", lw=0.8, ls=":")
  ax.set_xscale("log")
  ax.set_xlim(1, report["n_latents"])
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("number of latents (best first)")
  ax.set_ylabel("share of score mass (mean over concepts)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)


def plot_report(report: Mapping[str, Any], path: str, title: str = "") -> None:
  """Writes a PNG: per-concept top-1 (and assigned) share, and the mean
  cumulative score-mass curve per domain vs number of latents (log x)."""
  from matplotlib.figure import Figure  # deferred: matplotlib only to plot
  rows = _concept_rows(report)
  n = len(rows)
  fig = Figure(figsize=(max(8.0, 0.28 * n + 2), 8.5))
  ax1, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1.2, 1.0]})
  x = np.arange(n)
  colours = [_COLOURS[dom] for dom, _ in rows]
  sup = report["supervised"]
  w = 0.4 if sup else 0.8
  ax1.bar(x - (w / 2 if sup else 0), [q["top1_share"] for _, q in rows], w, color=colours,
          label="best latent")
  if sup:
    ax1.bar(x + w / 2, [q["assigned_share"] for _, q in rows], w, color=colours, alpha=0.45, hatch="//",
            edgecolor="black", lw=0.3, label="assigned latent")
    for i, (_, q) in enumerate(rows):
      if not q["assigned_is_best"]:
        ax1.text(i + w / 2, q["assigned_share"] + 0.01, "x", ha="center", fontsize=7, color="red")
  n_obj = len(report["domains"]["objects"]["concepts"])
  if 0 < n_obj < n:
    ax1.axvline(n_obj - 0.5, color="black", lw=0.8)
  ax1.set_xticks(x, [q["name"] for _, q in rows], rotation=90, fontsize=7)
  ax1.set_xlim(-0.6, n - 0.4)
  ax1.set_ylim(0, 1.05)
  ax1.set_ylabel("share of the concept's score mass")
  means = ", ".join(f"{dom}: top-1 {e['mean_top1_share']:.2f}"
                    + (f", assigned {e['mean_assigned_share']:.2f}" if sup else "")
                    + f", {e['mean_n_latents_to_mass']:.1f} latents to {100 * report['mass_fraction']:g}%"
                    for dom, e in report["domains"].items() if e["concepts"])
  ax1.set_title(f"{title + chr(10) if title else ''}{means}", fontsize=9)
  if sup:
    ax1.legend(fontsize=8, loc="upper right", title="x: assigned is not best", title_fontsize=7)
  ax1.grid(True, axis="y", alpha=0.3)
  _curve_panel(ax2, report)
  ax2.set_title(f"cumulative score mass ({report['aggregation']})", fontsize=9)
  atomic_write_bytes(path, _png(fig))


def compare_reports(report_a: Mapping[str, Any] | str, report_b: Mapping[str, Any] | str,
                    labels: Sequence[str] = ("unsupervised", "supervised"), path: str = "association.png",
                    title: str = "") -> str:
  """Writes one PNG comparing two SAEs' association reports; returns ``path``.

  Reports are dicts from ``association_report`` or paths to report.json.
  Top: each concept's top-1 share for both SAEs (and the assigned share of a
  supervised one as a dot); concepts in report_a's order, matched by
  (domain, name). Bottom: both SAEs' mean cumulative score-mass curves.
  """
  from matplotlib.figure import Figure  # deferred: matplotlib only to plot
  reps = [read_json(r) if isinstance(r, str) else r for r in (report_a, report_b)]
  if len(labels) != 2:
    raise ValueError(f"compare_reports needs two labels, got {list(labels)}")
  rows = _concept_rows(reps[0])
  lookup = {(dom, q["name"]): q for dom, q in _concept_rows(reps[1])}
  n = len(rows)
  fig = Figure(figsize=(max(9.0, 0.34 * n + 2), 9.0))
  ax1, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1.2, 1.0]})
  x = np.arange(n)
  w = 0.4
  bars = [[q["top1_share"] for _, q in rows],
          [lookup[(dom, q["name"])]["top1_share"] if (dom, q["name"]) in lookup else np.nan for dom, q in rows]]
  for j, (label, shade) in enumerate(zip(labels, ("tab:gray", "tab:green"))):
    ax1.bar(x + (j - 0.5) * w, bars[j], w, color=shade, label=f"{label}: best latent")
  for j, rep in enumerate(reps):
    if rep["supervised"]:
      src = rows if j == 0 else [(dom, lookup.get((dom, q["name"]))) for dom, q in rows]
      ys = [q["assigned_share"] if q else np.nan for _, q in src]
      ax1.plot(x + (j - 0.5) * w, ys, "k.", ms=5, label=f"{labels[j]}: assigned latent")
  n_obj = len(reps[0]["domains"]["objects"]["concepts"])
  if 0 < n_obj < n:
    ax1.axvline(n_obj - 0.5, color="black", lw=0.8)
  ax1.set_xticks(x, [q["name"] for _, q in rows], rotation=90, fontsize=7)
  ax1.set_xlim(-0.6, n - 0.4)
  ax1.set_ylim(0, 1.05)
  ax1.set_ylabel("top-1 share of the concept's score mass")
  ax1.grid(True, axis="y", alpha=0.3)
  ax1.legend(fontsize=8, loc="upper right")
  summary = "\n".join(
      f"{label}: " + ", ".join(f"{dom} top-1 {e['mean_top1_share']:.2f} / {e['mean_n_latents_to_mass']:.1f} "
                               f"latents to {100 * rep['mass_fraction']:g}%"
                               for dom, e in rep["domains"].items() if e["concepts"])
      for label, rep in zip(labels, reps))
  ax1.set_title(f"{title + chr(10) if title else ''}{summary}", fontsize=9)
  for rep, label, ls in zip(reps, labels, ("--", "-")):
    _curve_panel(ax2, rep, label=label, linestyle=ls)
  ax2.set_title(f"cumulative score mass ({reps[0]['aggregation']}): dashed {labels[0]}, solid {labels[1]}",
                fontsize=9)
  atomic_write_bytes(path, _png(fig))
  return path
