"""The whole method in one command (module pipeline) on the tiny pipeline: end to end,
a rerun with nothing to do, and a run killed (SIGKILL) in the middle of a stage that a
rerun completes with the same report numbers as the uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from saemnesia_jax import pipeline
from saemnesia_jax.runtime import config_defaults
from saemnesia_jax.runtime.errors import RunMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, TESTS)
import tiny  # noqa: E402

# Small enough for seconds per stage; the same values on the command line below.
OVERRIDES = {
    "sampler.num_steps": 3, "sampler.batch_size": 6, "collect.seeds": (1, 2),
    "train.steps": 20, "train.batch_size": 64, "train.eval_every": 10, "train.ckpt_every": 10,
    "train.log_every": 10, "train.val_batches": 2, "probe.steps": 50,
    "evaluate.objects": ("cat",), "evaluate.styles": ("neon",), "evaluate.gammas": (-10.0,),
    "evaluate.percentiles": (99.0,), "evaluate.eval_seeds": (188,),
    "pipeline.judge": "stub_judge:StubJudge",
}


def _config(workdir):
  c = tiny.get_config()
  c.workdir = str(workdir)
  c.model.path = str(workdir.parent / "tiny_model")
  c.pipeline.sup_train = {"batch_size": 4, "steps": 20}
  for k, v in OVERRIDES.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def _cli(workdir):
  args = [f"--config.workdir={workdir}", f"--config.model.path={workdir.parent / 'tiny_model'}"]
  for k, v in OVERRIDES.items():
    args.append(f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}")
  return args


def _numbers(workdir):
  s = json.loads((workdir / "eval" / "summary.json").read_text())
  return {k: s[k] for k in ("table", "per_concept", "sequential", "chosen")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  from saemnesia_jax.diffusion import models
  from saemnesia_jax.diffusion import tiny as tiny_lib
  base = tmp_path_factory.mktemp("pipe")
  tiny_lib.write_tiny_pipeline(str(base / "tiny_model"), seed=0)
  work = base / "full"
  done = pipeline.run(_config(work), progress=False)
  return work, done


def test_pipeline_end_to_end_and_rerun(full_run, capsys):
  work, done = full_run
  default = config_defaults.PIPELINE["stages"]  # every step but the attack (off by default)
  assert "attack" not in default and done == {s: "ran" for s in default}
  report = (work / "report" / "report.md").read_text()
  for text in ("## Table 1", "published, not measured here", "saemnesia", "saeuron", "## Per concept",
               "## Sequential unlearning", "training.png", "commit:", "## Image quality under erasure",
               "| saemnesia | object |"):
    assert text in report, text
  for f in ("training.png", "erasure_grid.png", "sequential.png", "association_sae_sup.png"):
    assert (work / "report" / f).is_file(), f
  # Nothing to do: every stage is skipped (the report is rebuilt).
  t0 = time.perf_counter()
  again = pipeline.run(_config(work), progress=False)
  assert again == {**{s: "skipped" for s in default if s != "report"}, "report": "ran"}
  assert time.perf_counter() - t0 < 30
  # Other settings for a finished stage: refused by the stage, naming the field, not mixed in.
  c = _config(work)
  c.sae.k = c.sae.k // 2
  with pytest.raises(RunMismatchError, match=rf"sae\.k {c.sae.k * 2} -> {c.sae.k}"):
    pipeline.run(c, progress=False)


def test_pipeline_killed_mid_stage_resumes_to_the_same_numbers(full_run, tmp_path):
  work_full, _ = full_run
  work = work_full.parent / "killed"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, "-m", "saemnesia_jax.pipeline", f"--config={ROOT}/configs/tiny.py",
         "--config.pipeline.sup_train=" + "{'batch_size': 4, 'steps': 20}"] + _cli(work)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  units_dir = work / "eval" / "units" / "units"
  deadline = time.time() + 300
  # Kill it in the middle of the evaluate stage: some of its units written, not all.
  while time.time() < deadline and proc.poll() is None:
    if units_dir.is_dir() and len(list(units_dir.glob("*.json"))) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the pipeline finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert (work / "pipeline" / "scores_sup.json").is_file()
  assert not (work / "pipeline" / "evaluate.json").exists()
  done = pipeline.run(_config(work), progress=False)
  assert done["evaluate"] == "ran" and done["train"] == "skipped"
  assert _numbers(work) == _numbers(work_full)


def test_unlearn_on_a_pipeline_run(full_run):
  """The unlearn stage on another pipeline than CanvasMini: the workdir's SAEs, scores and
  the settings its evaluation chose."""
  from saemnesia_jax import unlearn
  work, _ = full_run
  c = _config(work)
  c.unlearn.concepts = ("cat",)
  c.unlearn.seeds = (188,)
  m = unlearn.run(c)
  assert m["chosen"] == os.path.join(str(work), "eval", "summary.json")
  chosen = json.loads((work / "eval" / "summary.json").read_text())["chosen"]
  assert m["methods"]["saemnesia"]["settings"] == {"object/cat": chosen["saemnesia/object/cat"]}
  assert m["methods"]["saemnesia"]["sae_dir"] == os.path.join(str(work), "sae_sup", "export")
  assert (work / "unlearn" / "grid.png").is_file()
  assert len(m["images"]) == len(m["prompts"]) * 3


def test_pipeline_trains_and_scores_an_sae_per_block_with_a_style_block(tmp_path, monkeypatch):
  """With config.style_block the train stages train one SAE per block, each in
  its block's workdir, as the train CLI does (train.train alone refuses two
  blocks), and the scores stages record each block's output folder."""
  from saemnesia_jax import scores, train
  c = _config(tmp_path / "run")
  c.style_block = "down_blocks.0.attentions.0"
  calls = []
  monkeypatch.setattr(train, "train", lambda cfg, progress=True: (calls.append((cfg.block, cfg.workdir)),
                                                                  {"step": 7})[1])
  out = train.pipeline_step(c, progress=False)
  assert calls == [(c.block, os.path.join(c.workdir, c.block)),
                   (c.style_block, os.path.join(c.workdir, c.style_block))]
  assert out == {c.block: 7, c.style_block: 7}
  # scores.run answers {block: result} with two blocks (scores.py); the stage records each out_dir.
  per_block = {b: {"out_dir": f"/x/{b}/scores", "wall_s": 1.0} for b in (c.block, c.style_block)}
  monkeypatch.setattr(scores, "run", lambda cfg, progress=True: per_block)
  assert scores.pipeline_step(c, progress=False) == {b: f"/x/{b}/scores" for b in per_block}
