"""Erasure rules beside the papers' (evaluate.variants): parsing, labels, selection."""
import math

import ml_collections
import pytest

from saemnesia_jax.diffusion import erase
from saemnesia_jax.evaluation import variants
from saemnesia_jax.runtime.errors import ConfigError


def _config(*texts):
  return ml_collections.ConfigDict({"evaluate": {"variants": texts}})


def test_parse_names_rules_gammas_and_selection():
  vs = variants.variants(_config("self: scale=self gammas=0/-0.5/-1", "cra: select=ua_ira_cra",
                                 "same: scale=mu threshold=mean steps=1 start=0", "late: start=0.5"))
  assert vs[0] == variants.PAPER and vs[0].label("saemnesia") == "saemnesia"
  assert vs[1].rules == (("scale", "self"),) and vs[1].gammas == (0.0, -0.5, -1.0)
  assert vs[1].label("saeuron") == "saeuron [self]" and variants.method_of("saeuron [self]") == "saeuron"
  assert vs[2].rules == () and vs[2].select == "ua_ira_cra"
  assert vs[3].rules == ()  # the papers' values are no rule: the papers' units are reused
  assert vs[4].rules == (("start", 0.5),)


@pytest.mark.parametrize("text, why", [
    ("noname scale=self", "no name"), ("x: scale=own", "scale='own'"), ("x: steps=0", r"\(0, 1\]"),
    ("x: start=1", r"\[0, 1\)"),
    ("x: gammas=1/-1", "<= 0"), ("x: select=best", "select='best'"), ("x: colour=red", "known key")])
def test_bad_variants_name_the_problem(text, why):
  with pytest.raises(ConfigError, match=why):
    variants.variants(_config(text))
  with pytest.raises(ConfigError, match="used twice"):
    variants.variants(_config("a: scale=self", "a: steps=0.5"))


def test_selection_criteria():
  m = {"UA": 0.9, "IRA": 0.8, "CRA": 0.5}
  assert variants.score("ua_ira", m) == pytest.approx(0.85)
  assert variants.score("ua_ira_cra", m) == pytest.approx(2.2 / 3)
  pic = {"recognised": 0.2, "coherent": 0.1}
  assert variants.score("ua_ira_recognised", m, pic) == pytest.approx(1.9 / 3)
  assert variants.score("ua_ira_recognised", m, {**pic, "recognised": math.nan}) == pytest.approx(1.7 / 3)
  assert variants.score("coherent_ira", m, pic) == pytest.approx(0.45)  # (0.1 + 0.8) / 2: UA is not used
  assert variants.score("coherent_ira", m, {**pic, "coherent": math.nan}) == pytest.approx(0.4)
  assert variants.score("ua_coherent_ira", m, pic) == pytest.approx(1.8 / 3)  # (0.9 + 0.1 + 0.8) / 3
  assert variants.score("ua_coherent_ira", m, {**pic, "coherent": math.nan}) == pytest.approx(1.7 / 3)
  for select in ("ua_ira_recognised", "coherent_ira", "ua_coherent_ira"):
    with pytest.raises(ConfigError, match="assess"):
      variants.score(select, m, None)
  assert variants.variants(_config("coh: select=coherent_ira"))[1].select == "coherent_ira"


def test_rules_reach_the_clamp_entry_through_the_setting():
  import numpy as np
  tables = {"mu_objects": np.ones((2, 3, 5), np.float32) * 4, "threshold_objects": np.ones((3, 5), np.float32),
            "assignment": np.array([1, 2, 3, 4])}
  paper = erase.concept_entry("saemnesia", tables, "object", 0, {"gamma": -2.0})
  assert paper.mu[0, 1] == 4 and paper.active.all()
  ruled = erase.concept_entry("saemnesia", tables, "object", 0, {"gamma": -2.0, "scale": "self", "steps": 0.34})
  assert ruled.mu[0, 1] == 1 and ruled.active[:, 0].tolist() == [True, True, False]


def test_per_method_gammas_give_equal_budgets():
  from saemnesia_jax.evaluation import plan as evaluate_plan
  v = variants.parse("fine: gammas.saemnesia=-0.1/-0.2/-0.5/-1 threshold=target")
  assert v.rules == (("threshold", "target"),)
  assert v.gammas_of("saemnesia", (-2.0,)) == (-0.1, -0.2, -0.5, -1.0)
  assert v.gammas_of("saeuron", (-2.0, -10.0)) == (-2.0, -10.0)  # the evaluation's grid
  config = ml_collections.ConfigDict({"evaluate": {"gammas": (-2.0, -10.0), "percentiles": (99.7, 99.9)}})
  assert len(evaluate_plan.settings(config, "saemnesia", v)) == 4
  assert len(evaluate_plan.settings(config, "saeuron", v)) == 4  # 2 percentiles x 2 gammas
  assert "saemnesia gammas (-0.1, -0.2, -0.5, -1.0)" in variants.describe(v, (-2.0, -10.0))
  with pytest.raises(ConfigError, match="gammas.<method>"):
    variants.parse("x: gammas.esd=-1")
  with pytest.raises(ConfigError, match="gammas.<method>"):
    variants.parse("x: scale.saemnesia=self")


def test_a_rule_grid_sweeps_both_rules_and_shares_the_papers_units():
  from saemnesia_jax.evaluation import plan as evaluate_plan
  v = variants.parse("both: threshold=mean/target gammas.saemnesia=-0.5/-1")
  assert v.rules == (("threshold", ("mean", "target")),)
  assert variants.rule_grid(v) == [{}, {"threshold": "target"}]
  config = ml_collections.ConfigDict({"evaluate": {"gammas": (-2.0,), "percentiles": (99.7, 99.9)}})
  assert evaluate_plan.settings(config, "saemnesia", v) == [
      {"gamma": -0.5}, {"gamma": -1.0}, {"gamma": -0.5, "threshold": "target"}, {"gamma": -1.0, "threshold": "target"}]
  # SAeUron: the same grid, so twice its trials as well (2 percentiles x 1 gamma x 2 thresholds).
  assert len(evaluate_plan.settings(config, "saeuron", v)) == 4
  # The mean-threshold half are the papers' settings: the same units, nothing sampled twice.
  paper = evaluate_plan.settings(config, "saemnesia", variants.parse("fine: gammas.saemnesia=-0.5/-1"))
  assert paper == evaluate_plan.settings(config, "saemnesia", v)[:2]
  assert variants.parse("one: threshold=mean/mean").rules == ()
  assert "threshold=mean/target" in variants.describe(v, (-2.0,))
  with pytest.raises(ConfigError, match="threshold='middle'"):
    variants.parse("x: threshold=mean/middle")
  with pytest.raises(ConfigError, match=r"\(0, 1\]"):
    variants.parse("x: steps=0.5/0")


def test_target_threshold_edits_only_above_the_concepts_own_mean():
  import numpy as np
  from saemnesia_jax.diffusion import clamp
  mu = np.arange(1, 16, dtype=np.float32).reshape(3, 5)
  e = clamp.concept_entry(mu, np.full((3, 5), 0.5, np.float32), -1.0, assigned=2)
  assert np.array_equal(clamp.with_rules(e, threshold="target").threshold, mu)
  # Two concepts on one latent: edited where either's threshold is exceeded.
  other = clamp.Entry(e.latents, e.active, mu, np.full((3, 5), 0.25, np.float32), -2.0)
  spec = clamp.build_spec([clamp.with_rules(e, threshold="target"), other], [900, 500, 100], [900, 500, 100], 8)
  assert spec.threshold[:, 0].tolist() == [0.25] * 3
  assert spec.multiplier[:, 0].tolist() == (mu[:, 2] * -2).tolist()
  spec = clamp.build_spec([clamp.with_rules(e, threshold="target")], [900, 500, 100], [900, 500, 100], 8)
  assert spec.threshold[:, 0].tolist() == mu[:, 2].tolist() and not spec.active[:, 1:].any()
