"""Does the picture survive an erasure? Image quality beside UA / IRA / CRA.

UA counts an image turned to noise as a successful erasure. Two measures
show whether the rest of the picture survived (docs/method.md section 6):

* **FD** (Fréchet distance, as FID but on the judge's own features): the
  distance between the Gaussians fitted to the penultimate-layer features of
  two image sets, here the images sampled *with* an erasure and the same
  prompts and seeds sampled *without* it:

      FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

  Units: squared feature units of the judge (the CanvasMini classifiers'
  flattened last feature maps; the UnlearnCanvas ViT-L's class token). It is
  0 for identical sets; like FID it is biased upward for small sets, so
  compare values over sets of the same size (every method here is measured
  on the same prompts and seeds).
* **Recognised share** of an erased concept's images: the fraction that the
  *other* domain's classifier still labels correctly with softmax
  confidence >= ``threshold`` (erase a style: is the object still there?).
  Images without a label in that domain (Seed_Images for a style) are left
  out. A fraction in [0, 1].
* **Coherent share** (coherent UA) of an erased concept's images: the
  fraction that is erased (the judge no longer names the erased concept)
  *and* still recognised in the other domain, i.e. erased without losing the
  picture. UA counts noise as erased; this share does not. A fraction in
  [0, 1], at most min(UA, recognised) over the same images.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from saemnesia_jax.evaluation.concepts import NO_STYLE


def _features(name: str, x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"{name}: features must be (n >= 2, dim), got shape {x.shape}")
  return x


def frechet_distance(a: Any, b: Any) -> float:
  """FD between feature sets ``a`` (n_a, d) and ``b`` (n_b, d).

  The trace of the matrix square root is computed in the samples' space:
  with S_a = A^T A and S_b = B^T B (A, B the centred features over
  sqrt(n - 1)), the non-zero eigenvalues of S_a S_b are those of
  (A B^T)(A B^T)^T, so tr((S_a S_b)^(1/2)) is the nuclear norm of A B^T: exact,
  no d x d matrix, and stable when d is larger than the sets (a singular S).
  """
  a, b = _features("a", a), _features("b", b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets of different widths: {a.shape[1]} and {b.shape[1]}")
  ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
  cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
  cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
  mean = np.sum((a.mean(0) - b.mean(0)) ** 2)
  return float(max(mean + np.sum(ca * ca) + np.sum(cb * cb) - 2.0 * cross, 0.0))


def recognised_share(true_ids: Any, pred_ids: Any, confidence: Any, threshold: float) -> float:
  """Share of the images with a label (``true_ids`` != NO_STYLE) that are
  predicted right with ``confidence`` >= ``threshold``; NaN with none."""
  true_ids, pred_ids = np.asarray(true_ids), np.asarray(pred_ids)
  confidence = np.asarray(confidence, np.float64)
  if not (true_ids.shape == pred_ids.shape == confidence.shape):
    raise ValueError(f"ids and confidences disagree in shape: {true_ids.shape}, {pred_ids.shape}, "
                     f"{confidence.shape}")
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"config.evaluate.recognised_confidence={threshold}: a probability in [0, 1]")
  labelled = true_ids != NO_STYLE
  if not labelled.any():
    return float("nan")
  ok = (pred_ids == true_ids) & (confidence >= threshold)
  return float(ok[labelled].mean())


def coherent_share(gone: Any, true_ids: Any, pred_ids: Any, confidence: Any, threshold: float) -> float:
  """Share of the images with a label in the other domain (``true_ids`` !=
  NO_STYLE) that are erased (``gone``: the judge no longer names the erased
  concept) and recognised in the other domain (as ``recognised_share``);
  NaN with none."""
  gone = np.asarray(gone, bool)
  if gone.shape != np.shape(true_ids):
    raise ValueError(f"erased flags and ids disagree in shape: {gone.shape}, {np.shape(true_ids)}")
  # A kept image counts as not recognised: its prediction becomes an id no label has.
  return recognised_share(true_ids, np.where(gone, pred_ids, min(NO_STYLE, 0) - 1), confidence, threshold)


def erasure_quality(erased_mask: np.ndarray, feats: np.ndarray | None, base_feats: np.ndarray | None,
                    other_true: np.ndarray, other_pred: np.ndarray, other_conf: np.ndarray | None,
                    threshold: float, gone: np.ndarray | None = None) -> dict[str, float]:
  """One erasure's quality figures over its answer set.

  ``erased_mask`` marks the erased concept's images; ``feats`` / ``base_feats``
  are the answer set's features with and without the erasure (same prompts and
  seeds, same order). ``other_*`` are the other domain's labels, predictions
  and confidences. Returns ``FD_erased`` (the erased concept's images against
  themselves unerased), ``FD_kept`` (every other image likewise) and
  ``recognised`` (see the module docstring), and with ``gone`` (per image of
  the answer set: the judge no longer names the erased concept) ``coherent``;
  a figure whose inputs are missing is absent.
  """
  out: dict[str, float] = {}
  m = np.asarray(erased_mask, bool)
  if feats is not None and base_feats is not None:
    if np.shape(feats) != np.shape(base_feats):
      raise ValueError(f"features with and without the erasure disagree in shape: {np.shape(feats)} and "
                       f"{np.shape(base_feats)} (are both units' seeds the same?)")
    if m.sum() >= 2:
      out["FD_erased"] = frechet_distance(feats[m], base_feats[m])
    if (~m).sum() >= 2:
      out["FD_kept"] = frechet_distance(feats[~m], base_feats[~m])
  if other_conf is not None:
    out["recognised"] = recognised_share(np.asarray(other_true)[m], np.asarray(other_pred)[m],
                                         np.asarray(other_conf)[m], threshold)
    if gone is not None:
      out["coherent"] = coherent_share(np.asarray(gone, bool)[m], np.asarray(other_true)[m],
                                       np.asarray(other_pred)[m], np.asarray(other_conf)[m], threshold)
  return out


QUALITY_KEYS = ("FD_erased", "FD_kept", "recognised", "coherent")


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
  """Mean of each quality key over ``rows`` (NaNs and absent keys skipped)."""
  out = {}
  for k in QUALITY_KEYS:
    v = [r[k] for r in rows if k in r and np.isfinite(r[k])]
    if v:
      out[k] = float(np.mean(v))
  return out


def format_markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
  """``{method: {domain: means}}`` as a markdown table (FD in feature units^2,
  recognised and coherent UA in percent)."""
  lines = ["| method | domain | FD erased concept | FD other images | recognised (%) | coherent UA (%) |",
           "|---|---|---|---|---|---|"]
  fmt = lambda v, pct=False: "n/a" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.2f}")
  for m, by_domain in table.items():
    for d, r in by_domain.items():
      lines.append(f"| {m} | {d} | {fmt(r.get('FD_erased'))} | {fmt(r.get('FD_kept'))} | "
                   f"{fmt(r.get('recognised'), True)} | {fmt(r.get('coherent'), True)} |")
  return "\n".join(lines) + "\n"
