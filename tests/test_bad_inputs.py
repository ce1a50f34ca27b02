"""Every bad input the project knows of, in one table, through the real entry
points (subprocesses): exit 2, at most three lines on stderr, no traceback,
the expected words, and every file under the case's workdir and its parent
byte-identical before and after.

A case is (entry point, argv, expected substring). In argv, {w} is the case's
own workdir (holding a user's file, with another beside it) and {d} the shared
folder of broken inputs (config files, damaged stores, a good store). Most
fail in the checks, before JAX loads, in about a second; the cases run in a
small thread pool.
"""
import concurrent.futures
import os
import subprocess
import sys

import pytest

from synthetic import make_concept_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY, MINI = "configs/tiny.py", "configs/canvas_mini.py"
T, M = ("saemnesia_jax.train", TINY), ("saemnesia_jax.unlearn", MINI)

CASES = [
    # -- values: the schema (NaN, inf, types, ranges), before any work
    ("unlearn", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.gamma=nan"),
     "config.unlearn.gamma=nan: must be a finite number"),
    ("sample", ("saemnesia_jax.sample", TINY, "--config.sampler.guidance_scale=inf"),
     "config.sampler.guidance_scale=inf: must be a finite number"),
    ("lr nan", (T, "--config.train.learning_rate=nan"), "config.train.learning_rate=nan"),
    ("lr inf", (T, "--config.train.learning_rate=inf"), "config.train.learning_rate=inf"),
    ("gammas positive", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.gammas=(5.0,)"),
     "config.evaluate.gammas=(5.0,): each element must be in (-inf, 0]"),
    ("gammas nan", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.gammas=(nan,)"),
     "config.evaluate.gammas=('(nan,)',): each element must be a number"),
    ("percentile 150", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.percentile=150"),
     "config.unlearn.percentile=150.0: must be in [0, 100)"),
    ("unlearn batch -1", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.batch_size=-1"),
     "config.unlearn.batch_size=-1"),
    ("seeds 188x", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.seeds=188x"),
     "config.unlearn.seeds=('188x',): each element must be an integer"),
    ("percentiles 100", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.percentiles=(100.0,)"),
     "config.evaluate.percentiles"),
    ("confidence 2", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.recognised_confidence=2"),
     "config.evaluate.recognised_confidence"),
    ("jpeg 101", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.jpeg_quality=101"),
     "config.evaluate.jpeg_quality=101"),
    ("style setting", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.saeuron_style_setting=(150.0,-1.0)"),
     "config.evaluate.saeuron_style_setting"),
    ("val_fraction 1", (T, "--config.train.val_fraction=1.0"), "config.train.val_fraction=1.0"),
    ("epochs -1", (T, "--config.train.epochs=-1"), "config.train.epochs=-1"),
    ("k 0", (T, "--config.sae.k=0"), "config.sae.k=0"),
    ("batch -1", (T, "--config.train.batch_size=-1"), "config.train.batch_size=-1"),
    ("num_steps 0", ("saemnesia_jax.collect", TINY, "--config.sampler.num_steps=0"), "config.sampler.num_steps=0"),
    ("height 30", ("saemnesia_jax.sample", TINY, "--config.sampler.height=30"), "config.sampler.height=30"),
    ("seeds -5", ("saemnesia_jax.sample", TINY, "--config.seeds=(-5,)"), "config.seeds=(-5,)"),
    ("dtype", ("saemnesia_jax.sample", TINY, "--config.model.dtype=float64"), "config.model.dtype='float64'"),
    ("probe val", ("saemnesia_jax.probe", TINY, "--config.probe.val_fraction=1.5"), "config.probe.val_fraction=1.5"),
    ("split", ("saemnesia_jax.scores", TINY, "--config.scores.split=test"), "config.scores.split='test'"),
    ("methods", ("saemnesia_jax.evaluate", TINY, "--config.evaluate.methods=('saeuron','unknown')"),
     "unknown method 'unknown'"),
    ("build steps", ("saemnesia_jax.canvas_mini.build", MINI, "--config.base_train.steps=0"),
     "config.base_train.steps=0"),
    ("pipeline stages", ("saemnesia_jax.pipeline", TINY, "--config.pipeline.stages=('collect','bogus')"),
     "config.pipeline.stages"),
    ("collect seeds", ("saemnesia_jax.collect", TINY, "--config.collect.seeds=()"), "config.collect.seeds=()"),
    # -- names that would become paths outside the run
    ("name ..", (T, "--config.train.name=..", "--config.overwrite=True"), "config.train.name='..'"),
    ("name .", (T, "--config.train.name=.", "--config.overwrite=True"), "config.train.name='.'"),
    ("name a/b", (T, "--config.train.name=a/b", "--config.overwrite=True"), "config.train.name='a/b'"),
    # -- prompts and concepts
    ("empty prompt", ("saemnesia_jax.sample", TINY, "--config.prompts=('',)"), "holds an empty prompt"),
    ("unlearn empty prompt", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.prompts=(' ',)"),
     "config.unlearn.prompts"),
    ("concept typo", (M, "--config.unlearn.concepts=('Dsik',)"), "did you mean Disk"),
    ("unlearn method", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.methods=('foo',)"),
     "unknown method 'foo'"),
    ("sae_dir two methods", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.sae_dir={d}"),
     "config.unlearn.sae_dir="),
    ("no SAE at sae_root", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.sae_root={d}"),
     "config.unlearn.sae_root="),
    ("chosen missing", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.chosen={d}/nope.json"),
     "config.unlearn.chosen="),
    ("chosen truncated", (M, "--config.unlearn.concepts=('Disk',)", "--config.unlearn.chosen={d}/trunc.json"),
     "not a readable JSON file"),
    # -- config files and flags
    ("help syntax error", ("saemnesia_jax.train", "{d}/syntax.py", "--help"), "syntax error at line 1"),
    ("help raises", ("saemnesia_jax.train", "{d}/raises.py", "--help"), "get_config() failed with RuntimeError"),
    ("syntax error", ("saemnesia_jax.train", "{d}/syntax.py"), "syntax error at line 1"),
    ("raises", ("saemnesia_jax.sample", "{d}/raises.py"), "RuntimeError: boom"),
    ("returns a dict", ("saemnesia_jax.train", "{d}/dict.py"), "returned a dict"),
    ("help dict", ("saemnesia_jax.train", "{d}/dict.py", "--help"), "returned a dict"),
    ("no get_config", ("saemnesia_jax.train", "{d}/empty.py"), "has no get_config()"),
    ("missing config", ("saemnesia_jax.train", "{d}/none.py"), "no config file"),
    ("typo", (T, "--config.sampler.widht=64"), "did you mean width"),
    ("far typo", (T, "--config.train.zzzqqq=1"), "its fields: adam_eps"),
    ("extra argument", (T, "stray"), "unexpected arguments"),
    ("workdir is a file", (T, "--config.workdir={d}/afile"), "is a file, not a folder"),
    # -- a read-only workdir ({d}/readonly: chmod a-w, refused for root too): before any work
    ("report read-only", ("saemnesia_jax.report", TINY, "--config.workdir={d}/readonly"),
     "readonly is read-only (dr-xr-xr-x): the stage could not write"),
    ("train read-only", (T, "--config.collect.store_path={d}/store", "--config.workdir={d}/readonly/w"),
     "config.workdir="),
    ("unlearn read-only", (M, "--config.unlearn.concepts=('Disk',)", "--config.workdir={d}/readonly"),
     "readonly/unlearn"),
    # -- damaged stores
    ("store truncated", (T, "--config.collect.store_path={d}/st_trunc"), "truncated or not JSON"),
    ("store {}", (T, "--config.collect.store_path={d}/st_empty"), "not an activation store manifest"),
    ("store missing", (T, "--config.collect.store_path={d}/none"), "no activation store"),
    ("verify truncated", ("saemnesia_jax.store", "verify", "{d}/st_trunc"), "truncated or not JSON"),
    ("verify {}", ("saemnesia_jax.store", "verify", "{d}/st_empty"), "not an activation store manifest"),
    ("summary missing", ("saemnesia_jax.store", "summary", "{d}/none"), "no activation store"),
    # -- past the checks (JAX loads): the data cannot give a batch
    ("batch > store", (T, "--config.collect.store_path={d}/store", "--config.train.batch_size=100000",
                       "--config.train.steps=2"), "larger than the selected data"),
]


def _argv(parts, case_dir, shared):
  flat = [x for p in parts for x in (p if isinstance(p, tuple) else (p,))]
  module, *rest = flat
  argv = [sys.executable, "-m", module]
  for a in rest:
    a = a.format(w=os.path.join(case_dir, "parent", "w"), d=shared)
    if a.startswith("configs/") or (a.endswith(".py") and not a.startswith("--")):
      argv += ["--config", a]
    else:
      argv.append(a)
  if module != "saemnesia_jax.store" and not any(a.startswith("--config.workdir=") for a in argv):
    argv.append(f"--config.workdir={os.path.join(case_dir, 'parent', 'w')}")
  return argv


def snapshot(folder) -> dict:
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, folder)] = open(p, "rb").read()
  return out


def _shared(root) -> str:
  d = os.path.join(root, "shared")
  os.makedirs(d)
  files = {"syntax.py": "def get_config(:\n", "raises.py": "def get_config():\n  raise RuntimeError('boom')\n",
           "dict.py": "def get_config():\n  return {'workdir': 'x'}\n", "empty.py": "X = 1\n",
           "trunc.json": '{"chosen": {"saemnesia/object/Disk": ', "afile": "not a folder\n"}
  for name, text in files.items():
    with open(os.path.join(d, name), "w") as f:
      f.write(text)
  make_concept_store(os.path.join(d, "store"), seeds=4)
  manifest = open(os.path.join(d, "store", "manifest.json")).read()
  for name, text in (("st_trunc", manifest[:50]), ("st_empty", "{}\n")):
    os.makedirs(os.path.join(d, name))
    with open(os.path.join(d, name, "manifest.json"), "w") as f:
      f.write(text)
  os.makedirs(os.path.join(d, "readonly"))
  os.chmod(os.path.join(d, "readonly"), 0o555)
  return d


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad_inputs"))
  shared = _shared(root)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("SAEMNESIA_DEBUG", None)

  def run(i):
    case_dir = os.path.join(root, f"case{i}")
    os.makedirs(os.path.join(case_dir, "parent", "w"))
    with open(os.path.join(case_dir, "parent", "user.txt"), "w") as f:
      f.write("beside the workdir\n")
    with open(os.path.join(case_dir, "parent", "w", "mine.txt"), "w") as f:
      f.write("inside the workdir\n")
    before = snapshot(case_dir)
    argv = _argv(CASES[i][1], case_dir, shared)
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return r, before, snapshot(case_dir), argv

  shared_before = snapshot(shared)
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    out = dict(zip(range(len(CASES)), pool.map(run, range(len(CASES)))))
  out["shared"] = (shared_before, snapshot(shared))
  return out


def test_the_shared_inputs_are_untouched(results):
  before, after = results["shared"]
  assert after == before, sorted(set(after) ^ set(before))


def test_the_table_is_large_enough():
  assert len(CASES) >= 40
  assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_short_error_and_changes_nothing(results, i):
  r, before, after, argv = results[i]
  expected = CASES[i][2]
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, (argv, r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert 1 <= len(lines) <= 3 and lines[0].startswith("error: "), r.stderr
  assert expected in r.stderr, (expected, r.stderr)
  assert after == before, sorted(set(after) ^ set(before))
