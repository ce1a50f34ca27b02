"""The tiny activation store shared by tests/test_store.py and tests/test_reader.py.

5 prompts x 2 seeds x 4 steps = 40 maps of 8 tokens x 16 channels; units of 12
maps (3 trajectories; the last unit holds 4), chunks of 4 maps. Each map's
values are a deterministic function of its row, with channel 0 = row and
channel 1 = token (exact in bfloat16), so every batch can be checked against
the data it should contain.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from saemnesia_jax import store as st

T, D = 8, 16
PROMPTS, SEEDS, STEPS = 5, 2, 4
N_MAPS = PROMPTS * SEEDS * STEPS
MPU, MPC = 12, 4
OBJECTS, STYLES = ["circle", "square", "star"], ["dots", "stripes"]


def manifest(**over) -> dict:
  kw = dict(model_dir="/models/mini", weights_sha256="ab" * 32, block="up_blocks_1/attentions_0",
            scheduler={"name": "ddim", "eta": 0.0}, num_steps=STEPS, guidance_scale=6.0,
            prompt_grid={"objects": OBJECTS, "styles": STYLES, "template": "a {object} in {style} style",
                         "seeds": list(range(SEEDS))},
            n_maps=N_MAPS, tokens_per_map=T, d_in=D, maps_per_unit=MPU, maps_per_chunk=MPC)
  kw.update(over)
  return st.make_manifest(**kw)


def map_data(rows: np.ndarray) -> np.ndarray:
  out = np.stack([np.random.default_rng(int(r)).normal(0.0, 3.0, (T, D)) for r in rows]).astype(np.float32)
  out[:, :, 0] = np.asarray(rows)[:, None]
  out[:, :, 1] = np.arange(T)[None, :]
  return out


def map_labels(rows: np.ndarray) -> dict[str, np.ndarray]:
  rows = np.asarray(rows)
  traj, step = rows // STEPS, rows % STEPS
  prompt, seed = traj // SEEDS, traj % SEEDS
  return {"object": prompt % 3, "style": prompt % 3 - 1, "timestep": 999 - 250 * step, "step": step,
          "prompt": prompt, "seed": seed}


def write_units(store: st.Store, units) -> list[int]:
  for u in units:
    r0, r1 = st.unit_rows(store, u)
    rows = np.arange(r0, r1)
    st.write_unit(store, u, map_data(rows), map_labels(rows))
  return list(units)


def tree(path: str) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = fh.read()
  return out


def make_ref(path: str) -> str:
  """A complete store written by one process, in this process."""
  store = st.open_store(path, manifest(), create=True)
  write_units(store, range(store.n_units))
  return path


def epoch(reader, n):
  return [next(reader) for _ in range(n)]


# The fixtures of the store and reader tests (imported by both modules).
@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> str:
  """A complete reference store, one per test module."""
  return make_ref(str(tmp_path_factory.mktemp("ref") / "store"))


@pytest.fixture
def copy(ref, tmp_path) -> str:
  """A fresh copy of the reference store, for tests that change it."""
  dst = str(tmp_path / "store")
  shutil.copytree(ref, dst)
  return dst
