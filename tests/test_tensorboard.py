"""ScalarWriter: event files that TensorBoard's own reader reads, without TensorFlow."""
import math
import os
import subprocess
import sys

import numpy as np
import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from saemnesia_jax.runtime import tensorboard as tb


def _read(logdir):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_read_back_with_tags_steps_and_values(tmp_path):
  logdir = str(tmp_path / "tb")
  with tb.ScalarWriter(logdir) as w:
    for step in (1, 2, 3):
      n = w.scalars(step, {"loss": 1.0 / step, "fvu": np.float32(0.5 * step), "dead_fraction": jnp.float32(0.25),
                           "object_acc": jnp.asarray(step / 4, jnp.bfloat16), "n_dead": np.int64(7)},
                    prefix="train/")
      assert n == 5
    w.scalars(4, {"loss": 0.2})
  assert os.path.basename(w.path).startswith("events.out.tfevents.")
  got = _read(logdir)
  assert sorted(got) == ["loss", "train/dead_fraction", "train/fvu", "train/loss", "train/n_dead",
                         "train/object_acc"]
  assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in got["train/loss"]], [1, 0.5, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in got["train/fvu"]], [0.5, 1.0, 1.5])
  np.testing.assert_allclose([v for _, v in got["train/object_acc"]], [0.25, 0.5, 0.75])
  assert got["train/n_dead"] == [(1, 7.0), (2, 7.0), (3, 7.0)]
  assert got["loss"] == [(4, pytest.approx(0.2))]


def test_non_finite_and_non_numeric_values_are_skipped(tmp_path):
  logdir = str(tmp_path / "tb")
  with tb.ScalarWriter(logdir) as w:
    assert w.scalars(1, {"loss": 0.5, "nan": math.nan, "inf": -np.inf, "jnan": jnp.float32(jnp.nan),
                         "name": "stripes", "number_string": "1.5", "none": None, "vector": np.ones(3),
                         "one_element_vector": jnp.ones((1,)), "complex": 1j, "dict": {"a": 1}}) == 1
    assert w.scalars(2, {"loss": math.nan}) == 0  # nothing finite: no event at all
    w.scalars(3, {"loss": 0.25})
  assert _read(logdir) == {"loss": [(1, 0.5), (3, 0.25)]}
  assert [tb.as_scalar(v) for v in (True, np.bool_(False), 3, np.float16(2.5))] == [1.0, 0.0, 3.0, 2.5]


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "tb"
  with tb.ScalarWriter(str(logdir), enabled=False) as w:  # every process but 0
    assert w.scalars(1, {"loss": 1.0}) == 0
    w.flush()
  assert w.path is None and not logdir.exists()


def test_closed_writer_ignores_calls(tmp_path):
  w = tb.ScalarWriter(str(tmp_path))
  w.scalars(1, {"loss": 1.0})
  w.close()
  w.close()
  assert w.scalars(2, {"loss": 2.0}) == 0
  w.flush()
  assert _read(str(tmp_path)) == {"loss": [(1, 1.0)]}


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
  logdir = str(tmp_path)
  with tb.ScalarWriter(logdir) as w:  # crashed after step 5, checkpoint at step 3
    for step in range(1, 6):
      w.scalars(step, {"loss": float(step)})
  with tb.ScalarWriter(logdir, purge_from=4) as w:
    for step in range(4, 7):
      w.scalars(step, {"loss": 10.0 * step})
  assert len(os.listdir(logdir)) == 2
  assert _read(logdir) == {"loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]}


def test_tensorflow_is_not_imported(tmp_path):
  # In a fresh interpreter (this one imported the reader, which would import an
  # installed TensorFlow): writing must not import it, installed or not.
  code = ("import sys; from saemnesia_jax.runtime import tensorboard as tb\n"
          f"with tb.ScalarWriter({str(tmp_path)!r}) as w: w.scalars(1, {{'loss': 1.0}})\n"
          "assert 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if m.startswith('tensorflow'))\n"
          "print('ok')")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
