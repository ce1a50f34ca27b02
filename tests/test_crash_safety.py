"""Crashes and failed writes lose nothing and leave nothing half-written.

kill -9 at a chosen write of each stage, then a rerun: the result equals an
uninterrupted run's, byte for byte, and no half-written file is ever visible.

Every place a stage commits a write calls ``io_utils.write_point()``; with
``SAEMNESIA_TEST_KILL_AT_WRITE=N`` the N-th call SIGKILLs the process there
(an atomic write: its temp file written, not renamed; a store unit or an
orbax checkpoint: its writes in flight). Each test here runs one stage in this
process for the reference (counting its write points) in one workdir,
snapshots its outputs and deletes them, runs the same stage in a subprocess
killed at a write point drawn at random (seeded: ``SAEMNESIA_TEST_KILL_SEED``,
default 0), checks that every file then visible under its final name is the
reference's (nothing half-written), reruns the stage here and compares.

CanvasMini's shipped pipeline (nothing to initialise), one store and SAE for
the whole module; the stages run in
pipeline order (collect, train + export, scores, evaluate, report), each on
the outputs of the one before.

Then: a full disk (a file-size limit) is a one-line error naming the file
and leaves no partial file; a run refused for its inputs leaves no
fingerprint; a rerun's metrics drop a line torn by a kill; a read-only
workdir is refused before any work.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from saemnesia_jax import collect, evaluate, report, scores, train
from saemnesia_jax.runtime import checks, io_utils, runs
from saemnesia_jax.runtime.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tiny  # noqa: E402
from stub_judge import StubJudge  # noqa: E402
from synthetic import BLOCK, make_concept_store  # noqa: E402

SEED = int(os.environ.get("SAEMNESIA_TEST_KILL_SEED", "0"))
# SAEMNESIA_TEST_KILL_ALL=1: every write point of every stage in turn (minutes; not in CI).
ALL_POINTS = os.environ.get("SAEMNESIA_TEST_KILL_ALL", "") not in ("", "0")
# Fields that are not the result: wall-clock times.
VOLATILE = ("wall_s", "wall_s_total", "tokens_per_s", "tokens_per_s_per_device")
ORDER = ("collect", "train", "scores", "evaluate", "report")


def _config(workdir, model_dir):
  c = tiny.get_config()
  c.workdir = str(workdir)
  c.model.path = model_dir
  c.block = "mid_block.attentions.0"  # CanvasMini's hooked block: 16 tokens of 64
  c.concepts.objects, c.concepts.styles = ("Disk", "Square"), ("Stripes", "Checker")
  c.sampler.num_steps = 2
  c.sampler.batch_size = 4
  c.collect.seeds = (1,)
  c.sae.k = 4
  c.train.update(dict(steps=6, batch_size=16, log_every=2, eval_every=3, ckpt_every=2, val_batches=1))
  c.evaluate.update(dict(methods=("none", "saeuron"), gammas=(-10.0,), sweep_seeds=(1,), eval_seeds=(188,),
                         sequential=False, grids=False))
  return c


def run_stage(stage, workdir, model_dir):
  """One stage on the module's workdir (also the killed subprocess's call)."""
  c = _config(workdir, model_dir)
  if stage == "collect":
    return collect.run(c)
  if stage == "train":
    return train.train(c, progress=False)
  if stage == "scores":
    return scores.run(c, progress=False)
  if stage == "evaluate":
    return evaluate.run(c, judge=StubJudge(), progress=False)
  if stage == "report":
    return report.build(c, c.workdir)
  raise ValueError(stage)


OUTPUTS = {"collect": "activations", "train": "sae_unsup", "scores": "sae_unsup/scores", "evaluate": "eval",
           "report": "report"}


def _tree(folder, skip=()):
  """Every file under ``folder`` but temp files (``.tmp-``) and ``skip`` (relative folders)."""
  out = {}
  for root, dirs, files in os.walk(folder):
    rel_root = os.path.relpath(root, folder)
    dirs[:] = [d for d in dirs if not d.startswith(".tmp-") and os.path.normpath(os.path.join(rel_root, d))
               not in skip]
    for f in files:
      if not f.startswith(".tmp-"):
        p = os.path.join(root, f)
        out[os.path.normpath(os.path.relpath(p, folder))] = open(p, "rb").read()
  return out


def _strip(rel, data):
  """A file's bytes with its wall-clock fields and lines taken out."""
  def drop(o):
    if isinstance(o, dict):
      return {k: drop(v) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
      return [drop(v) for v in o]
    return o
  if rel.endswith(".json"):
    return json.dumps(drop(json.loads(data)), sort_keys=True).encode()
  if rel.endswith(".jsonl"):
    return b"\n".join(json.dumps(drop(json.loads(l)), sort_keys=True).encode() for l in data.splitlines())
  if rel.endswith(".md"):
    return b"\n".join(l for l in data.split(b"\n") if not l.startswith(b"- written:"))
  return data


# What is compared: the stage's result. Not: checkpoints (orbax's own
# layout, restored exactly or the export would differ), TensorBoard files
# and the evaluation's cost table (wall times).
SKIP = {"train": ("checkpoints",), "scores": (), "collect": (), "evaluate": (), "report": ()}
SKIP_FILES = ("cost.md",)


def _result(stage, workdir):
  tree = _tree(os.path.join(workdir, OUTPUTS[stage]), SKIP[stage] + (("scores",) if stage == "train" else ()))
  return {k: _strip(k, v) for k, v in tree.items()
          if os.path.basename(k) not in SKIP_FILES and "tfevents" not in k}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("kill")
  model_dir = "canvas_mini"  # the shipped pipeline: nothing to initialise
  work = root / "w"
  driver = root / "driver.py"
  driver.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})
import jax
jax.config.update("jax_compilation_cache_dir", {os.path.join(ROOT, '.jax_cache')!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
from test_crash_safety import run_stage
run_stage(sys.argv[1], {str(work)!r}, {model_dir!r})
""")
  return work, model_dir, str(driver), set()


def _kill_and_rerun(world, stage):
  work, model_dir, driver, done = world
  for up in ORDER[:ORDER.index(stage)]:  # a test run alone (-k) makes its inputs first
    if up not in done:
      run_stage(up, work, model_dir)
      done.add(up)
  out = os.path.join(work, OUTPUTS[stage])
  before = io_utils.write_points()
  run_stage(stage, work, model_dir)
  n_points = io_utils.write_points() - before
  ref = _result(stage, work)
  ref_raw = _tree(out)
  assert ref and n_points >= 2, (stage, n_points, sorted(ref))
  points = ([random.Random(f"{SEED}-{stage}").randint(1, n_points)] if not ALL_POINTS
            else range(1, n_points + 1))
  for kill_at in points:
    shutil.rmtree(out)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **{io_utils.ENV_KILL_AT_WRITE: str(kill_at)})
    p = subprocess.run([sys.executable, driver, stage], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -9, (stage, kill_at, n_points, p.returncode, p.stderr[-3000:])
    # Nothing half-written: every file visible under its final name is whole
    # (the reference's bytes, or for a file with wall times, strict JSON).
    # Orbax's checkpoints are its own: a rerun restores one or starts afresh.
    for rel, data in _tree(out, SKIP[stage]).items():
      if rel in ref_raw and data != ref_raw[rel]:
        assert rel.endswith((".json", ".jsonl")) or "tfevents" in rel, (stage, kill_at, rel)
        for line in data.decode().splitlines() if rel.endswith(".jsonl") else [data.decode()]:
          json.loads(line)
    run_stage(stage, work, model_dir)
    got = _result(stage, work)
    assert sorted(got) == sorted(ref), (stage, kill_at, sorted(set(got) ^ set(ref)))
    for rel in ref:
      assert got[rel] == ref[rel], (stage, kill_at, n_points, rel)
    print(f"{stage}: killed at write point {kill_at} of {n_points}; the rerun equals the reference")
  done.add(stage)


@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_killed_at_a_write_reruns_to_the_same_result(world, stage):
  _kill_and_rerun(world, stage)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(world, tmp_path):
  """scores under a file-size limit (RLIMIT_FSIZE; SIGXFSZ ignored, so the
  write fails with EFBIG as on a full disk) between its fingerprint.json and
  its scores.npz: exit 2, one line naming the file, the cause and the fix,
  nothing under the final name, no temp file left."""
  work, model_dir, _, done = world
  for up in ORDER[:ORDER.index("scores") + 1]:
    if up not in done:
      run_stage(up, work, model_dir)
      done.add(up)
  ref = os.path.join(work, OUTPUTS["scores"])
  small, large = (os.path.getsize(os.path.join(ref, f)) for f in ("fingerprint.json", "scores.npz"))
  limit = (small + large) // 2
  assert small < limit < large
  out = os.path.join(work, "full_disk_scores")
  cfg = tmp_path / "full_disk.py"
  cfg.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})
from test_crash_safety import _config

def get_config():
  c = _config({str(work)!r}, {model_dir!r})
  c.scores.out_dir = {out!r}
  return c
""")
  script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from saemnesia_jax.runtime import cli
cli.main("scores", ["scores", "--config", {str(cfg)!r}])
"""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("SAEMNESIA_DEBUG", None)
  p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  err = p.stderr[p.stderr.index("error: "):].strip().splitlines()  # after the progress bar
  assert len(err) <= 2, err
  assert os.path.join(out, "scores.npz") in err[0] and "File too large" in err[0] and "free space" in err[0], err
  assert sorted(os.listdir(out)) == ["fingerprint.json"]  # no partial scores.npz, no temp file


def test_a_scores_run_refused_for_its_inputs_leaves_no_fingerprint(world):
  """Concepts that are not the store's are found before the run folder records anything."""
  work, model_dir, _, done = world
  for up in ORDER[:ORDER.index("scores")]:
    if up not in done:
      run_stage(up, work, model_dir)
      done.add(up)
  c = _config(work, model_dir)
  c.concepts.objects = ("Disk", "Ring")
  c.scores.out_dir = os.path.join(work, "refused_scores")
  with pytest.raises(UserError, match="concepts of config.concepts differ"):
    scores.run(c, progress=False)
  assert not os.path.exists(os.path.join(c.scores.out_dir, runs.FILE))
  c.concepts.objects = ("Disk", "Square")
  assert scores.run(c, progress=False)["n_maps"] > 0  # the fix proceeds


def test_a_rerun_cuts_the_metrics_back_to_its_checkpoint_torn_line_included(tmp_path):
  """Killed mid-line (a torn last line) or before the first checkpoint (no
  checkpoint at all): the rerun logs every step once, in strict JSON."""
  store_path = str(tmp_path / "acts")
  make_concept_store(store_path, seeds=4)
  c = tiny.get_config()
  c.block, c.collect.store_path, c.sae.expansion_factor, c.sae.k = BLOCK, store_path, 4, 4
  c.train.update(dict(steps=4, batch_size=32, log_every=1, eval_every=4, ckpt_every=2, val_fraction=0.0))
  for name, stop_after in (("torn", 3), ("before_first_checkpoint", 1)):
    c.workdir = str(tmp_path / name)
    c.train.stop_after = stop_after
    train.train(c, progress=False)
    metrics = os.path.join(c.workdir, "sae_unsup", "metrics.jsonl")
    if name == "torn":
      with open(metrics, "a") as f:
        f.write('{"step": 4, "lo')
    c.train.stop_after = 0
    train.train(c, progress=False)
    with open(metrics) as f:
      steps = [json.loads(l)["step"] for l in f]
    assert steps == [1, 2, 3, 4], (name, steps)


def test_a_read_only_folder_is_named_before_any_work(tmp_path, monkeypatch):
  """As root too: no write bit at all, or a file system mounted read-only;
  the nearest existing folder above a missing one is what counts."""
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o555)
  assert io_utils.read_only(str(ro / "w" / "report")) == f"{ro} is read-only (dr-xr-xr-x)"
  os.chmod(ro, 0o755)
  assert io_utils.read_only(str(ro / "w" / "report")) == ""
  real = os.statvfs
  monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_flag": real(p).f_flag | os.ST_RDONLY})())
  assert io_utils.read_only(str(ro / "w")) == f"{ro} is on a read-only file system"
  c = tiny.get_config()
  c.workdir = str(ro / "w")
  with pytest.raises(UserError, match=r"config\.workdir=.*read-only file system: the stage could not write"):
    checks.check("train", c)
