"""Stage `collect`: sampler captures into the activation store, resumably."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from saemnesia_jax import collect
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax import store
from saemnesia_jax.runtime.errors import RunMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_lib.write_tiny_pipeline(str(tmp_path_factory.mktemp("model") / "tiny"), seed=0)


def _config(model_dir, store_path, **collect_overrides):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny
  config = tiny.get_config()
  config.workdir = os.path.dirname(store_path)
  config.model.path = model_dir
  config.sampler.num_steps = STEPS
  config.sampler.batch_size = 2
  config.collect.store_path = store_path
  config.collect.update(collect_overrides)
  return config


def _contents(path):
  st = store.open_store(path)
  units = [store.read_unit(st, u) for u in range(st.n_units)]
  return (np.concatenate([u[0].astype(np.float32) for u in units]),
          np.concatenate([u[1] for u in units]), st)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ref") / "acts")
  result = collect.run(_config(model_dir, path))
  return path, result


def test_collection_covers_the_grid_once(reference):
  path, result = reference
  acts, labels, st = _contents(path)
  # 2 objects x 2 styles + 2 anchor prompts = 6 prompts, 2 seeds, 3 steps; 8x8 tokens of 64.
  assert acts.shape == (6 * 2 * STEPS, 64, 64)
  assert np.isfinite(acts).all() and acts.std() > 0
  fields = list(st.label_fields)
  key = labels[:, [fields.index(f) for f in ("prompt", "seed", "step")]]
  assert len({tuple(r) for r in key}) == len(key)  # no duplicate (prompt, seed, step)
  s = result["summary"]
  assert s["per_object"] == {"cat": 18, "dog": 18}
  assert s["per_style"] == {"(none)": 12, "neon": 12, "pastel": 12}
  assert sorted(s["per_step"].values()) == [12, 12, 12]
  man = st.manifest
  assert man["identity"]["block"] == "up_blocks.1.attentions.1"
  assert man["identity"]["num_steps"] == STEPS


def test_partial_run_then_rerun_equals_uninterrupted(model_dir, reference, tmp_path):
  path = str(tmp_path / "acts")
  first = collect.run(_config(model_dir, path, max_units=2))
  assert first["units_written"] == 2
  second = collect.run(_config(model_dir, path))
  assert second["units_written"] == 4  # only what was missing
  third = collect.run(_config(model_dir, path))
  assert third["units_written"] == 0
  a, la, _ = _contents(path)
  b, lb, _ = _contents(reference[0])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)


def test_two_processes_write_the_same_store_as_one(model_dir, reference, tmp_path):
  path = str(tmp_path / "acts")
  r0 = collect.run(_config(model_dir, path, process_index=0, process_count=2))
  r1 = collect.run(_config(model_dir, path, process_index=1, process_count=2))
  assert r0["units_written"] == 3 and r1["units_written"] == 3
  a, la, _ = _contents(path)
  b, lb, _ = _contents(reference[0])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)


def test_store_of_another_model_or_block_is_refused(tmp_path_factory, model_dir, reference):
  """Collect never appends to a store made by another model or at another
  block: one message names each differing field (the store is untouched)."""
  other = tiny_lib.write_tiny_pipeline(str(tmp_path_factory.mktemp("other") / "tiny"), seed=5)
  before = sorted(os.listdir(os.path.join(reference[0], "units")))
  with pytest.raises(RunMismatchError, match=r"(?s)identity\.weights_sha256 .*overwrite=True"):
    collect.run(_config(other, reference[0]))
  config = _config(model_dir, reference[0])
  config.block = "up_blocks.1.attentions.0"
  with pytest.raises(RunMismatchError, match=r"identity\.block \"up_blocks\.1\.attentions\.1\" -> "
                                             r"\"up_blocks\.1\.attentions\.0\""):
    collect.run(config)
  assert sorted(os.listdir(os.path.join(reference[0], "units"))) == before


def test_killed_collection_resumes(model_dir, reference, tmp_path):
  """SIGKILL a real collection process after its first unit; a rerun completes it."""
  path = str(tmp_path / "acts")
  cmd = [sys.executable, "-m", "saemnesia_jax.collect", "--config", os.path.join(ROOT, "configs/tiny.py"),
         f"--config.workdir={tmp_path}", f"--config.model.path={model_dir}",
         f"--config.sampler.num_steps={STEPS}", "--config.sampler.batch_size=2",
         f"--config.collect.store_path={path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  units = os.path.join(path, "units")
  # Markers only: a marker's atomic write puts a temp file beside them first.
  markers = lambda: [n for n in os.listdir(units) if n.startswith("u") and n.endswith(".json")]  # noqa: E731
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(units) and len(markers()) >= 1:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(markers())
  assert 1 <= done < 6, f"kill came too late or too early: {done} units done"
  result = collect.run(_config(model_dir, path))
  assert result["units_written"] == 6 - done
  a, la, _ = _contents(path)
  b, lb, _ = _contents(reference[0])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
