"""The probe stage: map-mean linear probes see concepts that move the map mean and
not concepts carried only by where on the map the activation sits."""
import json
import os

import ml_collections
import numpy as np
import pytest

from saemnesia_jax.runtime import config_defaults
from saemnesia_jax import probe
from saemnesia_jax import store

N_OBJ, N_STY, SEEDS, STEPS, T, D = 4, 3, 10, 2, 8, 16
BLOCK = "mid_block.attentions.0"


def _write_store(path, spatial_objects: bool):
  """Every map: noise + its style's direction on every token. Objects either add
  their own direction on every token (``spatial_objects=False``) or add one shared
  direction on two object-specific tokens, so that every object has the same map
  mean and differs only in where it sits."""
  rng = np.random.default_rng(0)
  dirs = np.linalg.qr(rng.standard_normal((D, D)))[0]
  prompts = [(o, s) for o in range(N_OBJ) for s in list(range(N_STY)) + [-1]]
  n_maps = len(prompts) * SEEDS * STEPS
  manifest = store.make_manifest(
      model_dir="synthetic", weights_sha256="0" * 64, block=BLOCK, scheduler={"class": "none"},
      num_steps=STEPS, guidance_scale=1.0,
      prompt_grid={"objects": [f"obj{i}" for i in range(N_OBJ)], "styles": [f"sty{i}" for i in range(N_STY)]},
      n_maps=n_maps, tokens_per_map=T, d_in=D, maps_per_unit=n_maps // 4, maps_per_chunk=STEPS,
      dtype="float16")
  st = store.open_store(str(path), manifest, create=True)
  acts = 0.3 * rng.standard_normal((n_maps, T, D))
  labels = {f: np.zeros(n_maps, np.int32) for f in store.LABEL_FIELDS}
  row = 0
  for p, (o, s) in enumerate(prompts):
    for seed in range(SEEDS):
      for step in range(STEPS):
        if spatial_objects:
          acts[row, [2 * o, 2 * o + 1]] += 3.0 * dirs[0]
        else:
          acts[row] += 2.0 * dirs[o]
        if s >= 0:
          acts[row] += 2.0 * dirs[N_OBJ + s]
        for f, v in zip(store.LABEL_FIELDS, (o, s, 999 - step, step, p, seed)):
          labels[f][row] = v
        row += 1
  for u in range(st.n_units):
    r0, r1 = store.unit_rows(st, u)
    store.write_unit(st, u, acts[r0:r1], {f: v[r0:r1] for f, v in labels.items()})


def _config(workdir, block=BLOCK):
  config = ml_collections.ConfigDict({"workdir": str(workdir), "block": block})
  config_defaults.add_stage_sections(config, probe=dict(steps=300, batch_size=64))
  return config


@pytest.mark.parametrize("spatial", [False, True], ids=["mean_direction", "spatial_only"])
def test_probe_sees_map_mean_concepts_only(tmp_path, spatial):
  _write_store(tmp_path / "activations", spatial_objects=spatial)
  report = probe.run(_config(tmp_path))
  saved = json.load(open(os.path.join(tmp_path, "probe", "probe.json"), encoding="utf-8"))
  assert saved["domains"]["style"]["accuracy"] == pytest.approx(report["domains"]["style"]["accuracy"])
  obj, sty = report["domains"]["object"], report["domains"]["style"]
  assert obj["n_train"] + obj["n_val"] == N_OBJ * (N_STY + 1) * SEEDS * STEPS
  assert sty["n_train"] + sty["n_val"] == N_OBJ * N_STY * SEEDS * STEPS  # no-style maps left out
  assert sty["accuracy"] > 0.95
  assert set(obj["per_step"]) == set(range(STEPS))
  if spatial:  # every object has the same map mean: nothing to read
    assert obj["accuracy"] < 0.5
  else:
    assert obj["accuracy"] > 0.95


def test_probe_refuses_a_store_of_another_block(tmp_path):
  _write_store(tmp_path / "activations", spatial_objects=False)
  with pytest.raises(probe.ProbeError, match="collect this block first"):
    probe.run(_config(tmp_path, block="up_blocks.1.attentions.1"))
