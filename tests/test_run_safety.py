"""Nothing lost: ``overwrite`` deletes only a run folder this project made for
the stage (its fingerprint.json says so), never the workdir, its parent, the
store or a foreign folder; run names are single plain path components; and a
refused run leaves no record behind that would refuse its corrected rerun."""
import json
import os
import subprocess
import sys

import pytest

from saemnesia_jax import train
from saemnesia_jax.runtime import checks, layout, runs
from saemnesia_jax.runtime.errors import ConfigError, RunMismatchError, UserError
from synthetic import BLOCK, make_concept_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("store") / "acts"
  make_concept_store(path, seeds=4)
  return str(path)


def _config(workdir, store_path, **train_overrides):
  c = tiny.get_config()
  c.workdir = str(workdir)
  c.block = BLOCK
  c.collect.store_path = store_path
  c.sae.expansion_factor = 4
  c.sae.k = 4
  c.train.update(dict(steps=2, batch_size=32, log_every=1, eval_every=2, ckpt_every=2, val_fraction=0.2,
                      val_batches=1, learning_rate=3e-3))
  c.train.update(train_overrides)
  return c


def snapshot(folder) -> dict:
  """Every file under ``folder`` (links as their target) and its bytes."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for f in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
      p = os.path.join(root, f)
      out[os.path.relpath(p, folder)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
  return out


@pytest.fixture
def user_files(tmp_path):
  """A workdir with a user's file inside it, and one beside it."""
  work = tmp_path / "parent" / "w"
  work.mkdir(parents=True)
  (tmp_path / "parent" / "user.txt").write_text("beside the workdir\n")
  (work / "mine.txt").write_text("inside the workdir\n")
  return work


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("SAEMNESIA_DEBUG", None)
  return subprocess.run([sys.executable, "-m", "saemnesia_jax.train", "--config", "configs/tiny.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../w2", "/tmp/x", ".hidden", "-x"])
def test_a_run_name_is_one_plain_path_component(name, user_files, store_path):
  config = _config(user_files, store_path, name=name)
  config.overwrite = True
  before = snapshot(user_files.parent)
  with pytest.raises(ConfigError, match=r"config\.train\.name=.*plain folder name"):
    checks.check("train", config)
  with pytest.raises(ConfigError, match=r"config\.train\.name"):
    train.train(config, progress=False)  # the Python API refuses too
  assert snapshot(user_files.parent) == before


@pytest.mark.parametrize("name", ["..", "."])
def test_overwrite_with_dot_names_deletes_nothing_from_the_command_line(name, user_files, store_path):
  before = snapshot(user_files.parent)
  r = _cli(f"--config.workdir={user_files}", f"--config.collect.store_path={store_path}",
           f"--config.train.name={name}", "--config.overwrite=True", "--config.train.steps=2")
  assert r.returncode == 2, r.stderr
  assert "config.train.name" in r.stderr and "Traceback" not in r.stderr
  assert snapshot(user_files.parent) == before


def test_overwrite_refuses_a_folder_it_did_not_make(user_files, store_path):
  foreign = user_files / "sae_unsup"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("someone else's\n")
  before = snapshot(user_files.parent)
  config = _config(user_files, store_path)
  config.overwrite = True
  with pytest.raises(RunMismatchError, match=r"overwrite refuses to delete .*without a fingerprint\.json"):
    train.train(config, progress=False)
  assert snapshot(user_files.parent) == before


def test_overwrite_refuses_another_stages_folder(user_files, store_path):
  other = user_files / "sae_unsup"
  other.mkdir()
  (other / runs.FILE).write_text(json.dumps({"stage": "evaluate", "settings": {}, "inputs": {}}))
  (other / "summary.json").write_text("{}\n")
  before = snapshot(user_files.parent)
  config = _config(user_files, store_path)
  config.overwrite = True
  with pytest.raises(RunMismatchError, match=r"not a train's run \(stage 'evaluate'\)"):
    train.train(config, progress=False)
  assert snapshot(user_files.parent) == before


def test_overwrite_never_deletes_the_workdir_even_as_the_run_folder(user_files, store_path):
  """A run folder that is the workdir itself (a link to it) holding a train
  record: overwrite still refuses, the workdir and everything in it stay."""
  (user_files / runs.FILE).write_text(json.dumps({"stage": "train", "settings": {"sae.k": 99}, "inputs": {}}))
  os.symlink(str(user_files), str(user_files / "sae_unsup"))
  before = snapshot(user_files.parent)
  config = _config(user_files, store_path)
  config.overwrite = True
  with pytest.raises(RunMismatchError, match=r"overwrite refuses to delete .*it is or holds"):
    train.train(config, progress=False)
  assert snapshot(user_files.parent) == before


def test_overwrite_never_deletes_the_store(tmp_path, store_path):
  """A run folder under which the store lies (collect.store_path inside it) is kept."""
  work = tmp_path / "w"
  run = work / "sae_unsup"
  run.mkdir(parents=True)
  (run / runs.FILE).write_text(json.dumps({"stage": "train", "settings": {"sae.k": 99}, "inputs": {}}))
  os.symlink(store_path, str(run / "acts"))
  config = _config(work, str(run / "acts"))
  config.overwrite = True
  before = snapshot(tmp_path)
  with pytest.raises(RunMismatchError, match=r"it is or holds"):
    train.train(config, progress=False)
  assert snapshot(tmp_path) == before


def test_overwrite_still_replaces_its_own_run(tmp_path, store_path):
  train.train(_config(tmp_path, store_path), progress=False)
  (tmp_path / "mine.txt").write_text("kept\n")
  config = _config(tmp_path, store_path)
  config.sae.k = 2
  config.overwrite = True
  assert train.train(config, progress=False)["step"] == 2
  assert json.load(open(tmp_path / "sae_unsup" / runs.FILE))["settings"]["sae.k"] == 2
  assert (tmp_path / "mine.txt").read_text() == "kept\n"


def test_a_refused_run_leaves_no_record_and_its_fix_proceeds(tmp_path, store_path):
  """A batch larger than the store fails before the run folder records
  anything; the corrected rerun is then a new run, not 'other settings'."""
  config = _config(tmp_path, store_path, batch_size=100_000)
  with pytest.raises(UserError, match="larger than the selected data"):
    train.train(config, progress=False)
  assert not os.path.exists(os.path.join(layout.run_dir(config), runs.FILE))
  assert train.train(_config(tmp_path, store_path), progress=False)["step"] == 2


def test_a_validation_batch_larger_than_its_split_is_refused_before_any_record(tmp_path, store_path):
  config = _config(tmp_path, store_path, batch_size=200, val_fraction=0.1)  # 240 train tokens, few val ones
  with pytest.raises(UserError, match="larger than the selected data"):
    train.train(config, progress=False)
  assert not os.path.exists(os.path.join(layout.run_dir(config), runs.FILE))


def test_a_diverged_run_stops_at_the_first_non_finite_loss_and_exports_nothing(tmp_path, store_path, monkeypatch):
  """A NaN in the 4th batch: the run stops at step 4, names it and the last
  checkpoint (step 2), exports nothing, and metrics.jsonl stays strict JSON."""
  calls = {"n": 0}
  real_place = train.place

  def place(tr, raw):
    batch = real_place(tr, raw)
    calls["n"] += 1
    if calls["n"] == 4:
      batch = {**batch, "x": batch["x"] * float("nan")}
    return batch

  monkeypatch.setattr(train, "place", place)
  config = _config(tmp_path, store_path, steps=6, val_fraction=0.0)
  with pytest.raises(train.NonFiniteLossError, match=r"loss is nan at step 4.*last checkpoint is step 2"):
    train.train(config, progress=False)
  run = layout.run_dir(config)
  assert not os.path.exists(os.path.join(run, "export"))
  with open(os.path.join(run, "metrics.jsonl")) as f:
    lines = [json.loads(l, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) for l in f]
  assert [l["step"] for l in lines] == [1, 2, 3]
