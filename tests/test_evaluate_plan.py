"""The evaluation's plan without a model: sweep units per seed, and the choice pooled over seeds."""
import os
import sys

import pytest

from saemnesia_jax.evaluation import plan, variants
from saemnesia_jax.runtime import units as units_lib
from saemnesia_jax.runtime.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

# Answer set per seed: (cat, neon), (cat, pastel), (dog, neon), (dog, pastel).
TRUE_OBJ, TRUE_STY = [0, 0, 1, 1], [0, 1, 0, 1]
# Predicted objects per (seed, gamma) when erasing cat (object 0):
# seed 1 alone favours the mild gamma (UA 1, IRA 1 against UA 1, IRA 0.5);
# seed 5 shows the mild gamma does not erase there, so pooled the strong one wins
# ((0.5 + 1) / 2 = 0.75 against (1 + 0.75) / 2 = 0.875).
PRED_OBJ = {(1, -1.0): [1, 1, 1, 1], (1, -10.0): [1, 1, 0, 1],
            (5, -1.0): [0, 0, 1, 1], (5, -10.0): [1, 1, 1, 1]}


def _config(seeds):
  c = tiny.get_config()
  c.evaluate.update(dict(methods=("none", "saemnesia"), objects=("cat",), styles=("pastel",), sweep_seeds=seeds))
  return c


def _fill(results, config):
  for u in plan.sweep_units(config):
    (seed,) = u["seeds"]
    if u["method"] == "none" or u["domain"] == "style":
      pred_obj = TRUE_OBJ
    else:
      pred_obj = PRED_OBJ[(seed, u["setting"]["gamma"])]
    results.write(u, {"true_object": TRUE_OBJ, "true_style": TRUE_STY, "pred_object": pred_obj,
                      "pred_style": TRUE_STY, "wall_s": 1.0})


def test_the_sweep_has_a_unit_per_seed_and_chooses_on_all_of_them(tmp_path):
  one, two = _config((1,)), _config((1, 5))
  # 1 baseline + 2 concepts x 2 gammas, per seed.
  assert len(plan.sweep_units(one)) == 5 and len(plan.sweep_units(two)) == 10
  assert all(len(u["seeds"]) == 1 for u in plan.sweep_units(two))
  # A seed added to the sweep keeps the units already sampled (same ids).
  ids = {units_lib.unit_id(u) for u in plan.sweep_units(one)}
  assert ids <= {units_lib.unit_id(u) for u in plan.sweep_units(two)}
  results = units_lib.UnitResults(str(tmp_path))
  _fill(results, two)
  assert plan.choose(one, results)[("saemnesia", "object", "cat")] == {"gamma": -1.0}
  assert plan.choose(two, results)[("saemnesia", "object", "cat")] == {"gamma": -10.0}
  pooled = plan.pooled(results, plan.sweep_trial(two, "saemnesia", "object", "cat", {"gamma": -1.0}))
  assert pooled["pred_object"] == PRED_OBJ[(1, -1.0)] + PRED_OBJ[(5, -1.0)] and "wall_s" not in pooled


@pytest.mark.parametrize("seeds", [(), (1, 1)])
def test_bad_sweep_seeds_say_what_to_give(seeds):
  with pytest.raises(ValueError, match="distinct seeds"):
    plan.sweep_units(_config(seeds))


def test_grid_rows_pick_the_erasure_grids_rows_by_label():
  c = _config((1,))
  c.evaluate.methods = ("none", "saeuron", "saemnesia")
  c.evaluate.variants = ("both: threshold=mean/target", "cra: select=ua_ira_cra")
  labels = lambda: [v.label(m) for m, v in plan.grid_arms(c)]
  # Every method under every rule by default, in the table's order.
  assert labels() == ["saeuron", "saemnesia", "saeuron [both]", "saemnesia [both]", "saeuron [cra]",
                      "saemnesia [cra]"]
  c.evaluate.grid_rows = ("saemnesia [cra]", "saemnesia")
  assert labels() == ["saemnesia", "saemnesia [cra]"]  # the table's order, not the config's
  c.evaluate.grid_rows = ("saemnesia [bucoh]",)
  with pytest.raises(ConfigError, match=r"grid_rows: 'saemnesia \[bucoh\]' is not a row.*saeuron \[both\]"):
    plan.grid_arms(c)


def test_the_rule_is_chosen_on_the_development_seeds_and_only_its_row_goes_on(tmp_path):
  """evaluate.rule_seeds: each row's choices are judged on the development seeds,
  the method's best row by Table 1's avg is kept beside the papers' rule, and
  the held-out finals are other units (other seeds)."""
  c = _config((1,))
  c.evaluate.update(dict(variants=("cra: select=ua_ira_cra", "other: select=ua_ira_cra"),
                         eval_seeds=(188,), rule_seeds=(6,)))
  mild, strong = {"gamma": -1.0}, {"gamma": -10.0}
  chosen = {("saemnesia", "object", "cat"): mild, ("saemnesia", "style", "pastel"): mild,
            ("saemnesia [cra]", "object", "cat"): strong, ("saemnesia [cra]", "style", "pastel"): mild,
            ("saemnesia [other]", "object", "cat"): mild, ("saemnesia [other]", "style", "pastel"): mild}
  devs = plan.rule_units(c, chosen)
  # none + 3 distinct (concept, setting) answer sets, every one on seed 6 only.
  assert len(devs) == 4 and all(u["seeds"] == [6] for u in devs)
  finals = plan.final_units(c, chosen)
  assert not {units_lib.unit_id(u) for u in devs} & {units_lib.unit_id(u) for u in finals}
  results = units_lib.UnitResults(str(tmp_path))
  for u in devs:
    # The strong gamma erases cat (every cat image judged dog) and keeps dog; the mild one erases nothing.
    erased_cat = u.get("domain") == "object" and u["setting"] == strong
    results.write(u, {"true_object": TRUE_OBJ, "true_style": TRUE_STY,
                      "pred_object": [1, 1, 1, 1] if erased_cat else TRUE_OBJ, "pred_style": TRUE_STY,
                      "wall_s": 1.0})
  rules = plan.choose_rules(c, results, chosen)
  assert rules["chosen"] == {"saemnesia": "saemnesia [cra]"}
  # Only the object UA differs (1 against 0): one sixth of Table 1's average.
  assert rules["avg"]["saemnesia [cra]"] - rules["avg"]["saemnesia"] == pytest.approx(1 / 6)
  assert rules["avg"]["saemnesia [other]"] == rules["avg"]["saemnesia"]  # a tie keeps the papers' row
  kept = plan.reported(c, chosen, rules)
  assert {label for label, _, _ in kept} == {"saemnesia", "saemnesia [cra]"}
  assert plan.reported(c, chosen, None) == chosen  # no rule seeds: every row
  # unlearn and attack read each method at its headline row's settings.
  summary = {"chosen": {"/".join(k): s for k, s in kept.items()}, "headline": rules["chosen"]}
  picked = variants.headline_choices(summary)
  assert picked["saemnesia/object/cat"] == strong and picked["saemnesia/style/pastel"] == mild
  assert variants.headline_choices({"chosen": summary["chosen"]})["saemnesia/object/cat"] == mild


def test_choices_at_an_edge_of_the_grid_are_named():
  c = _config((1,))
  c.evaluate.update(dict(gammas=(-1.0, -5.0, -10.0), variants=("wide: gammas.saemnesia=-1/-5/-10/-40",)))
  chosen = {("saemnesia", "object", "cat"): {"gamma": -10.0}, ("saemnesia", "style", "pastel"): {"gamma": -5.0},
            ("saemnesia [wide]", "object", "cat"): {"gamma": -10.0},
            ("saemnesia [wide]", "style", "pastel"): {"gamma": -1.0}}
  # -10 is the strongest of (-1, -5, -10) but inside (-1 ... -40); -1 is the mildest of both.
  assert plan.edge_choices(c, chosen) == {"saemnesia": ["object/cat"], "saemnesia [wide]": ["style/pastel"]}
