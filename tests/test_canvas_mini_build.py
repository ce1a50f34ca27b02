"""The CanvasMini build's training recipe: the epsilon phase, then the
v-prediction fine-tune with its own schedule (configs/canvas_mini.py)."""
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.canvas_mini import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import canvas_mini  # noqa: E402


def _learning_rates(t, steps):
  schedule = build.learning_rate_schedule(t)
  return np.array([float(schedule(i)) for i in range(steps)])


def test_two_phase_schedule_restarts_at_the_phase_boundary():
  t = canvas_mini.get_config().base_train
  t.update(dict(steps=30, epsilon_steps=20, warmup_steps=4, finetune_warmup_steps=3,
                learning_rate=1e-2, finetune_learning_rate=3e-3, weight_decay=0.0, grad_clip=100.0))
  lr = _learning_rates(t, 30)
  np.testing.assert_allclose(lr[4], 1e-2, rtol=1e-3)  # end of the first warm-up: the peak
  assert lr[19] < 0.05 * 1e-2  # the first cosine has decayed to its floor (2%)
  assert lr[20] == pytest.approx(0.0, abs=1e-9)  # the second phase warms up from 0
  np.testing.assert_allclose(lr[23], 3e-3, rtol=1e-3)  # to its own peak
  assert lr[29] < lr[24]
  # One phase when epsilon_steps is 0: a single warm-up + cosine over all steps.
  t.epsilon_steps = 0
  one = _learning_rates(t, 30)
  np.testing.assert_allclose(one[4], 1e-2, rtol=1e-3)
  assert np.all(np.diff(one[4:]) <= 1e-12)


def test_training_target_switches_from_noise_to_v():
  x0, noise = jnp.full((2, 3, 4, 4), 0.5), jnp.full((2, 3, 4, 4), -1.0)
  a = jnp.array([0.64, 0.36])[:, None, None, None]
  v = np.array([0.8 * -1.0 - 0.6 * 0.5, 0.6 * -1.0 - 0.8 * 0.5])
  before = build.training_target(x0, noise, a, jnp.int32(5), 6, "v_prediction")
  after = build.training_target(x0, noise, a, jnp.int32(6), 6, "v_prediction")
  np.testing.assert_allclose(before, noise)
  np.testing.assert_allclose(after[:, 0, 0, 0], v, rtol=1e-6)
  np.testing.assert_allclose(build.training_target(x0, noise, a, jnp.int32(9), 6, "epsilon"), noise)
  with pytest.raises(ValueError, match="'epsilon' or 'v_prediction'"):
    build.training_target(x0, noise, a, 0, 0, "sample")
