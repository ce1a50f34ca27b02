"""Bootstrap intervals of Table 1 (evaluation/intervals.py) on hand-made cases with known answers."""
import math

import numpy as np
import pytest

from saemnesia_jax.evaluation import intervals, metrics

from test_metrics import ANSWERS, OBJECTS, STYLES, cols


def _answer(a=ANSWERS):
  t_obj, t_sty, p_obj, p_sty = cols(a)
  return {"true_object": t_obj.tolist(), "true_style": t_sty.tolist(), "pred_object": p_obj.tolist(),
          "pred_style": p_sty.tolist()}


def test_identity_draw_reproduces_the_metrics_exactly():
  """With every image drawn once (idx = arange), the replicate equals erasure_metrics' numbers."""
  ans = _answer()
  idx = np.arange(len(ANSWERS))[None]
  for domain, erased, kw in [("object", [0], {}), ("object", [1, 2], {}), ("style", [1], {}),
                             ("style", [0], {"cra_unstyled_only": True}),
                             ("object", [0], {"cra_exclude_erased": True})]:
    got = intervals.replicate_metrics(ans, domain, erased, idx, 3, 3, **kw)
    want = metrics.erasure_metrics(*cols(), erased, domain, **kw)
    for m in ("UA", "IRA", "CRA"):
      assert got[m][0] == pytest.approx(want[m]), (domain, erased, kw, m)


def test_bernoulli_interval_covers_p_with_the_normal_width():
  """n Bernoulli(p) outcomes: the 95% interval covers p and is ~ 2 * 1.96 * sqrt(p (1 - p) / n) wide."""
  rng = np.random.default_rng(3)
  p, n = 0.7, 2000
  x = rng.random(n) < p
  share, lo, hi = intervals.proportion_interval(x, n_boot=2000, seed=1)
  assert lo < p < hi
  width = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
  assert hi - lo == pytest.approx(width, rel=0.12)
  assert lo < share < hi


def test_table_interval_of_a_known_accuracy_covers_it_95_times_in_100():
  """One erased object whose images are right with probability p: over repeated experiments UA's
  95% interval covers 1 - p about 95% of the time, and its width is the binomial one (the
  stratified draw keeps the object's n images)."""
  n_per, p, hits, widths = 200, 0.8, 0, []
  t_obj = np.repeat([0, 1], n_per)
  t_sty = np.tile([0, 1], n_per)
  for trial in range(200):
    rng = np.random.default_rng(100 + trial)
    p_obj = np.where(rng.random(2 * n_per) < p, t_obj, 1 - t_obj)
    ans = {"true_object": t_obj, "true_style": t_sty, "pred_object": p_obj, "pred_style": t_sty}
    reps = intervals.table_replicates({"m": [("object", [0], ans)]}, 2, 2, n_boot=400, seed=trial)
    lo, hi = intervals.table_intervals(reps)["m"]["object_UA"]
    hits += lo <= 1 - p <= hi
    widths.append(hi - lo)
  assert 0.89 <= hits / 200 <= 0.99
  assert np.mean(widths) == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n_per), rel=0.1)
  assert np.isnan(reps["m"]["style_UA"]).all()  # no style erased: NaN, as average_table gives


def test_paired_difference_of_identical_methods_is_zero_and_seeded():
  ans = _answer()
  rows = {"a": [("object", [0], ans), ("style", [1], ans)], "b": [("object", [0], ans), ("style", [1], ans)]}
  reps = intervals.table_replicates(rows, 3, 3, n_boot=300, seed=7)
  d = intervals.paired_difference(reps, "a", "b", n_now=5)
  for k, r in d.items():
    assert r["diff"] == 0 and r["lo"] == 0 and r["hi"] == 0, k
    assert math.isinf(r["seeds_needed"])
  again = intervals.table_replicates(rows, 3, 3, n_boot=300, seed=7)
  for k in reps["a"]:
    np.testing.assert_array_equal(reps["a"][k], again["a"][k])  # a fixed seed: the same intervals


def test_paired_difference_is_centred_on_the_true_gap_and_narrower_than_unpaired():
  """Method b is a with 10% of the erased object's right answers turned wrong: UA(b) - UA(a)
  is about 0.1; pairing removes the shared image noise."""
  rng = np.random.default_rng(5)
  n = 600
  t_obj = np.repeat([0, 1], n)
  t_sty = np.tile([0, 1], n)
  p_a = np.where(rng.random(2 * n) < 0.5, t_obj, 1 - t_obj)
  flip = (t_obj == 0) & (p_a == 0) & (rng.random(2 * n) < 0.2)
  p_b = np.where(flip, 1, p_a)
  a = {"true_object": t_obj, "true_style": t_sty, "pred_object": p_a, "pred_style": t_sty}
  b = dict(a, pred_object=p_b)
  reps = intervals.table_replicates({"a": [("object", [0], a)], "b": [("object", [0], b)]}, 2, 2,
                                    n_boot=1000, seed=2)
  d = intervals.paired_difference(reps, "b", "a", n_now=1)["object_UA"]
  true_gap = np.mean(p_a[:n] == 0) - np.mean(p_b[:n] == 0)
  assert d["diff"] == pytest.approx(true_gap, abs=0.01)
  assert d["lo"] < true_gap < d["hi"] and d["lo"] > 0  # separated
  unpaired = np.std(reps["b"]["object_UA"]) + np.std(reps["a"]["object_UA"])
  assert d["se"] < 0.5 * unpaired


def test_seeds_needed_formula():
  assert intervals.seeds_needed(5, 0.02, 0.0392) == pytest.approx(5 * (1.959964 * 0.02 / 0.0392) ** 2)
  assert intervals.seeds_needed(5, 0.02, 0.02 * 1.959964) == pytest.approx(5)  # exactly at the edge now
  assert intervals.seeds_needed(3, 0.01, -0.01) == pytest.approx(3 * 1.959964 ** 2)


def test_units_of_other_images_are_refused():
  a = _answer()
  b = dict(a, true_style=list(reversed(a["true_style"])))
  with pytest.raises(ValueError, match="different images"):
    intervals.table_replicates({"a": [("object", [0], a)], "b": [("object", [0], b)]}, 3, 3, n_boot=10)


def test_format_with_intervals():
  assert intervals.fmt(0.9598, (0.941, 0.976)) == "95.98 [94.1, 97.6]"
  assert intervals.fmt(float("nan")) == "n/a"
  rows = {"x": dict(zip(metrics.TABLE1_KEYS, [0.5] * 7))}
  iv = {"x": {k: [0.4, 0.6] for k in metrics.TABLE1_KEYS}}
  md = metrics.format_markdown(rows, intervals=iv)
  assert "| x | 50.00 [40.0, 60.0] |" in md
  assert metrics.format_markdown(rows) == metrics.format_markdown(rows, intervals=None)


def test_report_table1_carries_intervals_and_the_paired_difference():
  from saemnesia_jax import report  # the stage that renders report.md
  keys = metrics.TABLE1_KEYS
  summary = {"table": {"saeuron": dict.fromkeys(keys, 0.9), "saemnesia": dict.fromkeys(keys, 0.95)},
             "intervals": {"saeuron": {k: [0.85, 0.94] for k in keys}},
             "difference": {k: {"diff": 0.05, "lo": 0.01, "hi": 0.09, "se": 0.02, "seeds_needed": 0.8}
                            for k in keys},
             "bootstrap": {"n_boot": 1000, "level": 0.95, "eval_seeds": 5}}
  t = report.table1(summary)
  assert "| saeuron | 90.00 [85.0, 94.0] |" in t
  assert "| saemnesia | 95.00 | 95.00 |" in t  # no interval recorded: the number alone
  text = "\n".join(report.difference_section(summary))
  assert "| avg | +5.00 | [+1.00, +9.00] | 2.00 | 1 (separated now) |" in text
  assert report.difference_section({"table": {}}) == []


def test_paired_grouped_difference_known_cases():
  rng = np.random.default_rng(0)
  a = [rng.integers(0, 2, 40) for _ in range(5)]
  assert intervals.paired_grouped_difference(a, a) == (0.0, 0.0, 0.0)  # the same images: no spread at all
  ones, zeros = [np.ones(8)] * 3, [np.zeros(8)] * 3
  assert intervals.paired_grouped_difference(ones, zeros) == (1.0, 1.0, 1.0)
  # b = a without its hits on the first quarter of the images: the paired interval
  # holds the exact gap and is tight (the shared images' noise cancels).
  b = [np.where(np.arange(40) < 10, 0, x) for x in a]
  d, lo, hi = intervals.paired_grouped_difference(a, b)
  exact = np.mean([x.mean() - y.mean() for x, y in zip(a, b)])
  assert d == pytest.approx(exact) and lo <= exact <= hi and hi - lo < 0.2
  with pytest.raises(ValueError, match="same, non-zero number"):
    intervals.paired_grouped_difference([np.ones(3)], [np.ones(4)])
