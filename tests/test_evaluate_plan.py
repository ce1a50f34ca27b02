"""The evaluation's plan without a model: sweep units per seed, and the choice pooled over seeds."""
import os
import sys

import pytest

from saemnesia_jax.evaluation import plan
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
