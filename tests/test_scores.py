"""Stage `scores`: importance scores, greedy assignment and association report
on a synthetic store whose concepts each add one direction, scored by a
hand-built SAE with one latent per direction."""
import os

import ml_collections
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from saemnesia_jax.evaluation import association
from saemnesia_jax import scores
from saemnesia_jax.sae import sparsify_io
from saemnesia_jax import store
from saemnesia_jax.runtime.io_utils import atomic_write_json, hash_files, read_json

OBJECTS = ("cat", "dog", "owl")
STYLES = ("neon", "pastel")
STEPS, SEEDS, T, D_IN, N_LAT, K = 2, (1, 2), 4, 8, 12, 3
TIMESTEPS = (900, 400)
IDENTITY = dict(weights_sha256="f00d", block="up_blocks.1.attentions.1")

# Tolerances of float32 results (the scores and the report are float32 sums):
# a few ulps, so that no assertion depends on the order of a float reduction.
F32_RTOL = 8 * float(np.finfo(np.float32).eps)  # ~1e-6
F32_ATOL = 1e-7


def _grid():
  """(object, style) per prompt: object x style, then one anchor per object (style -1)."""
  return [(o, s) for o in range(len(OBJECTS)) for s in range(len(STYLES))] + [(o, -1) for o in range(len(OBJECTS))]


def _make_store(path):
  """36 maps: 9 prompts x 2 seeds x 2 steps; object o adds e_o, style s adds e_{3+s}."""
  grid = _grid()
  n_maps = len(grid) * len(SEEDS) * STEPS
  manifest = store.make_manifest(
      model_dir="synthetic", scheduler={"class": "none"}, num_steps=STEPS, guidance_scale=9.0,
      prompt_grid={"objects": list(OBJECTS), "styles": list(STYLES)}, n_maps=n_maps, tokens_per_map=T,
      d_in=D_IN, maps_per_unit=4, maps_per_chunk=2, **IDENTITY)
  st = store.open_store(path, manifest, create=True)
  r = np.random.default_rng(0)
  acts = 0.05 * r.standard_normal((n_maps, T, D_IN))
  labels = {f: np.zeros(n_maps, np.int32) for f in store.LABEL_FIELDS}
  row = 0
  for p, (o, s) in enumerate(grid):
    for seed in SEEDS:
      for step in range(STEPS):
        acts[row, :, o] += r.uniform(1.0, 2.0, T) * (1.0 + step)  # the object's direction
        if s >= 0:
          acts[row, :, 3 + s] += r.uniform(0.5, 1.0, T)  # the style's direction
        for f, v in zip(store.LABEL_FIELDS, (o, s, TIMESTEPS[step], step, p, seed)):
          labels[f][row] = v
        row += 1
  for u in range(st.n_units):
    r0, r1 = store.unit_rows(st, u)
    store.write_unit(st, u, acts[r0:r1], {f: v[r0:r1] for f, v in labels.items()})
  stored = acts.astype(ml_dtypes.bfloat16).astype(np.float32)  # what the reader gives back
  return stored, labels


def _params(d_in=D_IN):
  """Latent j < 5 reads direction e_j; latents 5.. read small random directions."""
  r = np.random.default_rng(1)
  w = np.zeros((d_in, N_LAT), np.float32)
  w[:5, :5] = np.eye(5)
  w[:, 5:] = 0.3 * r.standard_normal((d_in, N_LAT - 5)) / np.sqrt(d_in)
  w_dec = w.T / np.linalg.norm(w.T, axis=1, keepdims=True)
  return {"W_enc": w, "b_enc": np.zeros(N_LAT, np.float32), "W_dec": w_dec.astype(np.float32),
          "b_dec": np.zeros(d_in, np.float32)}


def _save_sae(folder, params=None, mode="unsupervised", assignment=None, identity=None):
  params = _params() if params is None else params
  sparsify_io.save_sparsify(params, {"k": K}, folder, overwrite=True)
  atomic_write_json(os.path.join(folder, "saemnesia.json"), {
      "mode": mode, "store_identity": identity, "block": IDENTITY["block"], "objects": list(OBJECTS),
      "styles": list(STYLES), "assignment": assignment})
  return folder


def _config(workdir, **section):
  config = ml_collections.ConfigDict()
  config.workdir = str(workdir)
  config.concepts = ml_collections.ConfigDict(dict(objects=OBJECTS, styles=STYLES))
  config.collect = ml_collections.ConfigDict(dict(store_path=""))  # '' -> {workdir}/activations
  if section:
    config.scores = ml_collections.ConfigDict(section)
  return config


def _reference(acts, labels, params):
  """mu and scores of both domains, computed independently in numpy."""
  z = np.maximum((acts - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0.0)  # (M, T, L)
  top = np.argsort(-z, axis=-1)[..., :K]
  codes = np.zeros_like(z)
  np.put_along_axis(codes, top, np.take_along_axis(z, top, axis=-1), axis=-1)
  m = codes.mean(axis=1)  # (M, L)
  out = {}
  for dom, field, n in (("objects", "object", len(OBJECTS)), ("styles", "style", len(STYLES))):
    mu = np.zeros((n, STEPS, N_LAT))
    cnt = np.zeros((n, STEPS))
    for c in range(n):
      for s in range(STEPS):
        rows = (labels[field] == c) & (labels["step"] == s)
        cnt[c, s] = rows.sum()
        mu[c, s] = m[rows].mean(axis=0)
    sc = np.zeros_like(mu)
    for c in range(n):
      for s in range(STEPS):
        rows = (labels[field] >= 0) & (labels[field] != c) & (labels["step"] == s)
        notc = m[rows].mean(axis=0)  # pooled over the other concepts' maps
        sc[c, s] = mu[c, s] / (mu[c, s].sum() + 1e-8) - notc / (notc.sum() + 1e-8)
    out[dom] = (mu, cnt, sc)
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("scores")
  acts, labels = _make_store(str(workdir / "activations"))
  return workdir, acts, labels


@pytest.fixture(scope="module")
def unsup(data):
  """The stage through a config with no scores section: every default path."""
  workdir, _, _ = data
  _save_sae(str(workdir / "sae_unsup" / "export"), identity=dict(IDENTITY))
  return scores.run(_config(workdir), progress=False)


def test_default_paths_and_files(data, unsup):
  workdir = data[0]
  out = os.path.join(str(workdir), "sae_unsup", "scores")
  assert unsup["out_dir"] == out
  for key, name in (("scores", "scores.npz"), ("assignment", "assignment.json"), ("report_json", "report.json"),
                    ("report_png", "report.png"), ("manifest", "manifest.json")):
    assert unsup[key] == os.path.join(out, name) and os.path.isfile(unsup[key])
  with Image.open(unsup["report_png"]) as im:
    assert im.format == "PNG" and min(im.size) > 300
  man = read_json(unsup["manifest"])
  sae_dir = os.path.join(str(workdir), "sae_unsup", "export")
  assert man["sae"]["dir"] == sae_dir
  assert man["sae"]["safetensors_sha256"] == hash_files([os.path.join(sae_dir, "sae.safetensors")])
  assert man["store"]["path"] == os.path.join(str(workdir), "activations")
  assert man["store"]["identity"]["block"] == IDENTITY["block"]
  assert man["config"]["workdir"] == str(workdir) and man["n_maps"] == 36 and man["k"] == K
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # nothing half-written


def test_arrays_match_a_numpy_reference(data, unsup):
  _, acts, labels = data
  arr = scores.load_scores(unsup["out_dir"])
  n_obj, n_sty = len(OBJECTS), len(STYLES)
  shapes = {"mu_objects": (n_obj, STEPS, N_LAT), "scores_objects": (n_obj, STEPS, N_LAT),
            "mu_styles": (n_sty, STEPS, N_LAT), "scores_styles": (n_sty, STEPS, N_LAT),
            "counts_objects": (n_obj, STEPS), "counts_styles": (n_sty, STEPS),
            "threshold_objects": (STEPS, N_LAT), "threshold_styles": (STEPS, N_LAT),
            "timesteps": (STEPS,), "assignment": (n_obj + n_sty,)}
  for key, shape in shapes.items():
    assert arr[key].shape == shape, key
  ref = _reference(acts, labels, _params())
  for dom in ("objects", "styles"):
    mu, cnt, sc = ref[dom]
    np.testing.assert_allclose(arr[f"mu_{dom}"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(arr[f"counts_{dom}"], cnt)
    np.testing.assert_allclose(arr[f"scores_{dom}"], sc, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(arr[f"threshold_{dom}"], mu.mean(axis=0), rtol=1e-5, atol=1e-6)
  # Objects: 2 styles + 1 anchor prompt x 2 seeds per step; styles: 3 objects x 2 seeds (anchors excluded).
  np.testing.assert_array_equal(arr["counts_objects"], 6)
  np.testing.assert_array_equal(arr["counts_styles"], 6)
  np.testing.assert_array_equal(arr["timesteps"], TIMESTEPS)
  assert list(arr["objects"]) == list(OBJECTS) and list(arr["styles"]) == list(STYLES)


def test_each_concept_gets_its_own_latent(unsup):
  np.testing.assert_array_equal(unsup["assignment_ids"], [0, 1, 2, 3, 4])
  a = read_json(unsup["assignment"])
  assert a["objects"] == {"cat": 0, "dog": 1, "owl": 2} and a["styles"] == {"neon": 3, "pastel": 4}
  assert a["latents"] == [0, 1, 2, 3, 4]  # the list the trainer's supervised fine-tune reads
  np.testing.assert_array_equal(scores.load_assignment(unsup["out_dir"], OBJECTS, STYLES), [0, 1, 2, 3, 4])
  with pytest.raises(scores.ScoresError, match="caller has"):
    scores.load_assignment(unsup["assignment"], objects=("dog", "cat", "owl"))
  rep = read_json(unsup["report_json"])
  assert rep == unsup["report"] and not rep["supervised"]
  for dom, want in (("objects", [0, 1, 2]), ("styles", [3, 4])):
    rows = rep["domains"][dom]["concepts"]
    assert [q["best_latent"] for q in rows] == want
    for q in rows:
      assert 0.5 < q["top1_share"] <= 1.0 and q["n_latents_to_mass"] >= 1
      assert "assigned_share" not in q
    curve = rep["domains"][dom]["curve"]
    assert curve["n"][0] == 1 and curve["n"][-1] == N_LAT
    assert np.all(np.diff(curve["mass"]) >= -F32_ATOL) and abs(curve["mass"][-1] - 1.0) < 1e-6
    assert abs(curve["mass"][0] - rep["domains"][dom]["mean_top1_share"]) < 1e-6


def test_report_numbers_from_the_scores(unsup):
  """top-1 share and latents-to-90% recomputed from the saved scores by hand."""
  arr = scores.load_scores(unsup["out_dir"])
  for dom in ("objects", "styles"):
    mass = np.maximum(arr[f"scores_{dom}"].astype(np.float64), 0).mean(axis=1)
    for c, q in enumerate(unsup["report"]["domains"][dom]["concepts"]):
      srt = np.sort(mass[c])[::-1]
      assert abs(q["top1_share"] - srt[0] / srt.sum()) < 1e-5
      assert q["n_latents_to_mass"] == int(np.searchsorted(np.cumsum(srt) / srt.sum(), 0.9 - 1e-6) + 1)


def test_supervised_report_and_padded_batches(data, unsup, tmp_path):
  """A supervised SAE whose assignment swaps cat and dog: the report says so.
  batch_size 8 pads the last of 5 batches; the tables must not change."""
  workdir = data[0]
  sae_dir = _save_sae(str(tmp_path / "sae_sup" / "export"), mode="supervised", assignment=[1, 0, 2, 3, 4],
                      identity=dict(IDENTITY))
  res = scores.run(_config(workdir, sae_dir=sae_dir, batch_size=8), progress=False)
  assert res["out_dir"] == str(tmp_path / "sae_sup" / "scores")
  a, b = scores.load_scores(unsup["out_dir"]), scores.load_scores(res["out_dir"])
  for key in ("mu_objects", "mu_styles", "counts_objects", "counts_styles"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
  rep = res["report"]
  assert rep["supervised"] and rep["mode"] == "supervised"
  objs, stys = rep["domains"]["objects"]["concepts"], rep["domains"]["styles"]["concepts"]
  assert [q["assigned_latent"] for q in objs] == [1, 0, 2]
  assert [q["assigned_is_best"] for q in objs] == [False, False, True]
  assert [q["assigned_rank"] for q in objs][2] == 1 and min(q["assigned_rank"] for q in objs[:2]) > 1
  assert all(q["assigned_is_best"] for q in stys)
  for q in objs[:2]:
    assert q["assigned_share"] < 0.1 < q["top1_share"]
  # Two float32 reductions of the same numbers, in whatever order XLA sums
  # them: equal to float32 resolution, not bit for bit.
  assert objs[2]["assigned_share"] == pytest.approx(objs[2]["top1_share"], rel=F32_RTOL, abs=F32_ATOL)
  assert rep["domains"]["objects"]["assigned_is_best_count"] == 1
  text = association.format_report(rep)
  assert "assigned" in text and "NO" in text and "assigned is best 1/3" in text
  # Two SAEs side by side (the README figure).
  png = association.compare_reports(unsup["report_json"], rep, ("unsupervised", "supervised"),
                               path=str(tmp_path / "compare.png"))
  with Image.open(png) as im:
    assert im.format == "PNG" and min(im.size) > 300


def test_sae_that_does_not_fit_the_store(data, tmp_path):
  workdir = data[0]
  small = {key: v[:6] if key in ("W_enc", "b_dec") else v for key, v in _params().items()}
  small["W_dec"] = small["W_dec"][:, :6]
  sae_dir = _save_sae(str(tmp_path / "d6"), params=small)
  with pytest.raises(scores.ScoresError, match=r"d_in=6.*d_in=8.*scores.sae_dir"):
    scores.run(_config(workdir, sae_dir=sae_dir), progress=False)
  other = dict(IDENTITY, block="up_blocks.1.attentions.2")
  sae_dir = _save_sae(str(tmp_path / "other_block"), identity=other)
  with pytest.raises(scores.ScoresError, match=r"block: SAE trained on 'up_blocks.1.attentions.2', store has "
                                               r"'up_blocks.1.attentions.1'"):
    scores.run(_config(workdir, sae_dir=sae_dir), progress=False)
  assert not os.path.exists(tmp_path / "scores")  # nothing written


def test_bad_settings_are_named(data, tmp_path):
  workdir = data[0]
  with pytest.raises(scores.ScoresError, match=r"unknown fields \['batchsize'\]"):
    scores.settings(_config(workdir, batchsize=4))
  with pytest.raises(scores.ScoresError, match="no such folder"):
    scores.run(_config(workdir, sae_dir=str(tmp_path / "missing")), progress=False)
  config = _config(workdir, sae_dir=str(tmp_path / "x"))
  config.concepts.objects = ("cat", "dog")
  _save_sae(str(tmp_path / "x"))
  with pytest.raises(scores.ScoresError, match="concepts of config.concepts differ"):
    scores.run(config, progress=False)
