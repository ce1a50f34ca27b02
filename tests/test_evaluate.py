"""Stage `evaluate` end to end on the tiny pipeline: collect -> SAEs -> scores -> clamp sweeps -> tables."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from saemnesia_jax import collect, evaluate, models, scores, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402


class StubJudge:
  """Deterministic stand-in classifiers (the tiny model draws no real concepts):
  object = brighter or darker half, style = redder or bluer half."""

  def __init__(self):
    self.calls = 0

  def predict(self, images):
    self.calls += 1
    x = np.asarray(images)
    obj = (x.mean((1, 2, 3)) > np.median(x.mean((1, 2, 3)))).astype(np.int32)
    sty = (x[..., 0].mean((1, 2)) > x[..., 2].mean((1, 2))).astype(np.int32)
    return obj, sty


def _config(workdir, model_dir):
  c = tiny.get_config()
  c.workdir = str(workdir)
  c.model.path = model_dir
  c.sampler.num_steps = 3
  c.sampler.batch_size = 4
  c.train.update(dict(steps=30, batch_size=128, eval_every=15, ckpt_every=30, log_every=15))
  c.evaluate.grids = True
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A tiny pipeline with its store, both SAEs and both score tables (the inputs of evaluate)."""
  work = tmp_path_factory.mktemp("eval")
  model_dir = models.write_tiny_pipeline(str(work / "tiny"), seed=0)
  c = _config(work, model_dir)
  collect.run(c)
  train.train(c, progress=False)
  scores.run(c, progress=False)
  sup = _config(work, model_dir)
  sup.sae.update(dict(mode="supervised", assignment="greedy", init_from=str(work / "sae_unsup" / "export")))
  sup.train.update(dict(name="sae_sup", batch_size=4))
  train.train(sup, progress=False)
  sup.scores = {"sae_dir": str(work / "sae_sup" / "export")}
  scores.run(sup, progress=False)
  return work, model_dir


def test_evaluation_tables_trials_and_resume(prepared):
  work, model_dir = prepared
  c = _config(work, model_dir)
  judge = StubJudge()
  summary = evaluate.run(c, judge=judge, progress=False)
  out = work / "eval"
  for name in ("table.md", "table.csv", "sequential.md", "sequential.png", "summary.json", "erasure_grid.png"):
    assert (out / name).exists(), name
  cost = (out / "cost.md").read_text()
  assert "| saeuron | 2 | 8 |" in cost and "| saemnesia | 2 | 8 |" in cost, cost
  table = (out / "table.md").read_text()
  assert "| saemnesia |" in table and "| saeuron |" in table and "| none |" in table
  # Trials: SAEmnesia sweeps gamma only, SAeUron percentile x gamma.
  assert summary["trials_per_concept"] == {"saeuron": 2, "saemnesia": 2}
  n_units = len(list((out / "units" / "units").glob("*.json")))
  # sweep: 1 baseline + 4 concepts x (2 + 2); final: 1 + 4 x 2; sequential: 2 methods x 1
  assert n_units == 17 + 9 + 2
  assert judge.calls == n_units
  # A crash that lost some results: the rerun computes only those.
  lost = sorted((out / "units" / "units").glob("*saemnesia*.json"))[:3]
  for p in lost:
    p.unlink()
  judge2 = StubJudge()
  again = evaluate.run(c, judge=judge2, progress=False)
  assert judge2.calls == 3
  assert again["table"] == summary["table"]


def test_erasing_a_subset_draws_its_grid(prepared, tmp_path):
  """Erasing only the second object and style (not the config's first ones):
  the grid shows those, with a no-erasure row and one row per method each."""
  work, model_dir = prepared
  c = _config(work, model_dir)
  c.evaluate.update(dict(objects=("dog",), styles=("pastel",), sequential=False,
                         out_dir=str(tmp_path / "eval_subset")))
  summary = evaluate.run(c, judge=StubJudge(), progress=False)
  assert summary["erasure_grid"]["rows"] == [
      "dog: no erasure", "dog: saeuron", "dog: saemnesia",
      "pastel: no erasure", "pastel: saeuron", "pastel: saemnesia"]
  # tiny has 2 objects and 2 styles: 2 prompts with the concept and 2 without.
  assert summary["erasure_grid"]["columns"] == ["with 1", "with 2", "without 1", "without 2"]
  assert (tmp_path / "eval_subset" / "erasure_grid.png").exists()


def test_a_sweep_compiles_the_sampler_once(prepared):
  work, model_dir = prepared
  ctx = evaluate.Evaluation(_config(work, model_dir), judge=StubJudge())
  units = [u for u in evaluate.sweep_units(ctx.config) if u["method"] == "saemnesia"]
  for u in units[:3]:
    ctx.run_unit(u)
  sampler = ctx.sampler(ctx.methods["saemnesia"]["k"])
  assert sampler.n_traces == 1


def test_spec_grows_when_a_unit_selects_more_latents(prepared):
  """Sequential unlearning can select more latents than max_latents: the spec
  grows to the next power of two instead of failing after the sweep."""
  work, model_dir = prepared
  c = _config(work, model_dir)
  c.evaluate.max_latents = 1
  ctx = evaluate.Evaluation(c, judge=StubJudge())
  sampler = ctx.sampler(ctx.methods["saemnesia"]["k"])
  erase = [("object", "cat", {"gamma": -5.0}), ("object", "dog", {"gamma": -5.0}),
           ("style", "neon", {"gamma": -5.0})]
  spec = ctx.spec("saemnesia", erase, sampler)
  assert ctx.max_latents == 4 and spec.latents.shape == (4,)
  assert spec.active[:, :3].all() and not spec.active[:, 3].any()  # three assigned latents, one padding


def test_unknown_concept_lists_the_known_ones(prepared):
  work, model_dir = prepared
  c = _config(work, model_dir)
  c.evaluate.objects = ("unicorn",)
  with pytest.raises(KeyError, match="unknown object 'unicorn'; known objects: cat, dog"):
    evaluate.run(c, judge=StubJudge(), progress=False)


def test_two_processes_give_the_same_tables_as_one(prepared, tmp_path):
  """launch/local.sh starts two jax.distributed processes that split the units."""
  work, model_dir = prepared
  script = tmp_path / "run_eval.py"
  script.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'configs')!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import tiny
from test_evaluate import StubJudge, _config
from saemnesia_jax import evaluate
c = _config({str(work)!r}, {model_dir!r})
c.evaluate.out_dir = {str(tmp_path / 'eval2')!r}
c.evaluate.grids = False
evaluate.run(c, judge=StubJudge(), progress=False)
""")
  env = dict(os.environ, SAEMNESIA_LOG_DIR=str(tmp_path / "logs"))
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", sys.executable, str(script)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  two = json.loads((tmp_path / "eval2" / "summary.json").read_text())
  one = json.loads((work / "eval" / "summary.json").read_text())
  assert two["table"] == one["table"] and two["sequential"] == one["sequential"]
