"""Stage `evaluate` end to end on the tiny pipeline: collect -> SAEs -> scores -> clamp sweeps -> tables."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from saemnesia_jax import collect
from saemnesia_jax import evaluate
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax import scores
from saemnesia_jax import train

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


class AssessingStubJudge(StubJudge):
  """The stub plus what the quality measures read: confidences and features
  (each image's downsampled pixels)."""

  def assess(self, images):
    obj, sty = self.predict(images)
    x = np.asarray(images, np.float32)
    feats = x[:, ::4, ::4].reshape(len(x), -1)
    conf = np.abs(x.mean((1, 2, 3)) - 0.5) + 0.5
    return {"object": obj, "style": sty, "object_conf": conf, "style_conf": conf, "features": feats}


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
  model_dir = tiny_lib.write_tiny_pipeline(str(work / "tiny"), seed=0)
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
  judge = AssessingStubJudge()
  summary = evaluate.run(c, judge=judge, progress=False)
  out = work / "eval"
  for name in ("table.md", "table.csv", "sequential.md", "sequential.png", "summary.json", "erasure_grid.png",
               "quality.md"):
    assert (out / name).exists(), name
  cost = (out / "cost.md").read_text()
  assert "| saeuron | 2 | 8 |" in cost and "| saemnesia | 2 | 8 |" in cost, cost
  assert "per sweep seed (1,), pooled" in cost, cost
  table = (out / "table.md").read_text()
  assert "| saemnesia |" in table and "| saeuron |" in table and "| none |" in table
  # Every number with its 95% bootstrap interval; the paired difference and the seeds it needs.
  assert table.count(" [") >= 3 * 7 and "| saemnesia - saeuron |" in table and "seeds needed" in table
  assert set(summary["intervals"]) == {"none", "saeuron", "saemnesia"}
  lo, hi = summary["intervals"]["saemnesia"]["avg"]
  assert 0 <= lo <= hi <= 1
  d = summary["difference"]["avg"]
  assert d["diff"] == pytest.approx(summary["table"]["saemnesia"]["avg"] - summary["table"]["saeuron"]["avg"])
  assert d["lo"] <= d["hi"] and d["seeds_needed"] >= 0
  # Trials: SAEmnesia sweeps gamma only, SAeUron percentile x gamma.
  assert summary["trials_per_concept"] == {"saeuron": 2, "saemnesia": 2}
  n_units = len(list((out / "units" / "units").glob("*.json")))
  # sweep: 1 baseline + 4 concepts x (2 + 2); final: 1 + 4 x 2; sequential: 2 methods x 1
  assert n_units == 17 + 9 + 2
  assert judge.calls == n_units
  # Image quality: the no-erasure row compares the base images with themselves.
  q = summary["quality"]
  assert set(q) == {"none", "saeuron", "saemnesia"}
  assert q["none"]["object"]["FD_erased"] == pytest.approx(0, abs=1e-9)
  assert q["none"]["style"]["FD_kept"] == pytest.approx(0, abs=1e-9)
  assert all(np.isfinite(q[m][d]["FD_erased"]) and 0 <= q[m][d]["recognised"] <= 1
             for m in ("saeuron", "saemnesia") for d in ("object", "style"))
  # coherent UA: erased and still recognised, so never above recognised
  assert all(0 <= q[m][d]["coherent"] <= q[m][d]["recognised"] for m in q for d in ("object", "style"))
  assert "| saemnesia | style |" in (out / "quality.md").read_text()
  # Features go to each final unit's .npz, not into the JSON.
  assert len(list((out / "units" / "units").glob("*.npz"))) == 9
  # A crash that lost some results: the rerun computes only those.
  lost = sorted((out / "units" / "units").glob("*saemnesia*.json"))[:3]
  for p in lost:
    p.unlink()
  judge2 = AssessingStubJudge()
  again = evaluate.run(c, judge=judge2, progress=False)
  assert judge2.calls == 3
  assert again["table"] == summary["table"]
  assert again["quality"] == summary["quality"]
  # Leaving a method out continues the folder from its units; so does adding it back.
  c.evaluate.methods = ("none", "saemnesia")
  c.evaluate.grids = False
  judge3 = AssessingStubJudge()
  sub = evaluate.run(c, judge=judge3, progress=False)
  assert judge3.calls == 0 and set(sub["table"]) == {"none", "saemnesia"}
  assert sub["table"]["saemnesia"] == summary["table"]["saemnesia"]
  c.evaluate.methods = ("none", "saeuron", "saemnesia")
  judge4 = AssessingStubJudge()
  assert evaluate.run(c, judge=judge4, progress=False)["table"] == summary["table"]
  assert judge4.calls == 0


def test_erasing_a_subset_with_variants_draws_its_grid(prepared, tmp_path):
  """Erasing only the second object and style (not the config's first ones),
  under the papers' rule and two variants: every method gets every variant's
  row with the same trials, a select-only variant reuses the papers' sweep,
  and the grid shows a no-erasure row and one row per method and rule."""
  work, model_dir = prepared
  c = _config(work, model_dir)
  c.evaluate.update(dict(objects=("dog",), styles=("pastel",), sequential=False,
                         out_dir=str(tmp_path / "eval_subset"),
                         variants=("self: scale=self gammas=0/-1", "cra: select=ua_ira_cra")))
  judge = AssessingStubJudge()
  summary = evaluate.run(c, judge=judge, progress=False)
  rows = [f"{m}{v}" for v in ("", " [self]", " [cra]") for m in ("saeuron", "saemnesia")]
  assert list(summary["table"]) == ["none"] + rows
  assert set(summary["trials_per_concept"].values()) == {2}  # the same budget for every rule
  assert summary["chosen"]["saemnesia [self]/object/dog"]["scale"] == "self"
  assert "scale" not in summary["chosen"]["saemnesia [cra]/style/pastel"]
  # sweep: 1 baseline + 2 concepts x 2 methods x 2 settings x 2 sampled rules (cra shares the papers')
  sweep = [u for u in evaluate.sweep_units(c) if u["method"] != "none"]
  assert len(sweep) == 16 and judge.calls <= 1 + 16 + 1 + 2 * 6
  assert summary["erasure_grid"]["rows"] == [f"{n}: no erasure" if not r else f"{n}: {r}"
                                             for n in ("dog", "pastel") for r in [""] + rows]
  # tiny has 2 objects and 2 styles: 2 prompts with the concept and 2 without.
  assert summary["erasure_grid"]["columns"] == ["with 1", "with 2", "without 1", "without 2"]
  assert (tmp_path / "eval_subset" / "erasure_grid.png").exists()
  assert "[self] self: scale=self" in (tmp_path / "eval_subset" / "cost.md").read_text()
  # Re-evaluating with the settings this run chose: no sweep unit besides the baseline, the same tables.
  c.evaluate.update(dict(out_dir=str(tmp_path / "eval_reuse"), grids=False,
                         chosen_from=str(tmp_path / "eval_subset" / "summary.json")))
  assert [u["method"] for u in evaluate.sweep_units(c)] == ["none"]
  again = evaluate.run(c, judge=AssessingStubJudge(), progress=False)
  assert again["table"] == summary["table"] and again["chosen"] == summary["chosen"]
  assert "not rerun here" in (tmp_path / "eval_reuse" / "cost.md").read_text()
  # Another chosen_from file (a later evaluation's, with the same choices) continues the folder:
  # nothing is sampled again.
  later = dict(json.loads((tmp_path / "eval_subset" / "summary.json").read_text()), note="a later run")
  (tmp_path / "later.json").write_text(json.dumps(later))
  c.evaluate.chosen_from = str(tmp_path / "later.json")
  judge = AssessingStubJudge()
  assert evaluate.run(c, judge=judge, progress=False)["table"] == summary["table"] and judge.calls == 0


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
