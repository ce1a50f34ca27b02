"""protocol=released: each test pins one difference between the project's
choices and what SAeUron's and SAEmnesia's released code does (docs/method.md,
the protocol table). Where the release counts or selects, the test re-expresses
its rule in a few lines of numpy, independently of the project's code, and
compares the two on hand-made inputs.
"""
import io
import os
import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from saemnesia_jax import evaluate
from saemnesia_jax.runtime import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import canvas_mini  # noqa: E402
import sd15  # noqa: E402
import sd15_sup  # noqa: E402


def _small(protocol="released", objects=("Bears", "Cats", "Dogs"), styles=("Van_Gogh", "Cartoon", "Ukiyoe", "Winter"),
           **evaluate_fields):
  """A hand-built config: the concepts and the evaluate fields the metrics and plans read."""
  ev = dict(methods=("none", "saeuron", "saemnesia"), objects=(), styles=(), seed_images=True,
            gammas=(-1.0, -5.0), percentiles=(99.99, 99.999), sweep_seeds=(42,), eval_seeds=(188,),
            saemnesia_percentiles=(99.999,), saeuron_style_setting=(99.999, -1.0), variants=(), chosen_from="")
  ev.update(evaluate_fields)
  return ml_collections.ConfigDict(dict(protocol=protocol, block="b", style_block="", sampler=dict(guidance_scale=9.0),
                                        concepts=dict(objects=objects, styles=styles,
                                                      style_template="A {object} image in {style} style.",
                                                      anchor_templates=("A {object} image.",),
                                                      spaces_in_prompts=True, no_style="Seed_Images"),
                                        evaluate=ev))


# ------------------------------------------------------------ the protocol field


def test_sd15_runs_the_released_protocol_and_canvas_mini_the_projects():
  assert sd15.get_config().protocol == "released"
  assert sd15_sup.get_config().protocol == "released"
  assert canvas_mini.get_config().protocol == "project"


def test_protocol_sets_each_fields_default_and_a_given_field_wins():
  import subprocess
  from saemnesia_jax.evaluation import protocol
  c = sd15.get_config()
  assert protocol.value(c, "evaluate.kept_error") == "xhat_minus_x"
  assert protocol.value(c, "evaluate.noise") == "per_image"
  # On the command line (overrides apply after get_config): the protocol moves every
  # field left at '' / -1, and a field given a value keeps it.
  code = ("import sys; from saemnesia_jax.runtime import cli; from saemnesia_jax.evaluation import protocol as p; "
          "c = cli.parse('evaluate', sys.argv); "
          "print(p.value(c, 'evaluate.kept_error'), p.value(c, 'evaluate.noise'), "
          "p.value(c, 'evaluate.saemnesia_selection'), p.value(c, 'evaluate.jpeg_quality'))")
  out = subprocess.run([sys.executable, "-c", code, "--config", os.path.join(ROOT, "configs", "sd15.py"),
                        "--config.protocol=project", "--config.evaluate.noise=per_image"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
  assert out.stdout.split() == ["x_minus_xhat", "per_image", "assigned", "0"], out.stderr


def test_a_bad_protocol_value_is_one_line_naming_the_field():
  c = sd15.get_config()
  c.protocol = "paper"
  with pytest.raises(checks.ConfigError) as e:
    checks.check("evaluate", c)
  assert str(e.value).startswith("config.protocol='paper': ") and "\n" not in str(e.value)
  c = sd15.get_config()
  c.evaluate.kept_error = "x_plus_xhat"
  with pytest.raises(checks.ConfigError, match=r"^config\.evaluate\.kept_error='x_plus_xhat': [^\n]*$"):
    checks.check("evaluate", c)


def test_canvas_mini_fingerprints_do_not_change():
  """On ``project`` the new fields are left out: the evaluation's and the
  pipeline's fingerprints are those of the config without them."""
  from saemnesia_jax import pipeline
  from saemnesia_jax.evaluation import protocol
  from saemnesia_jax.runtime import runs
  c = canvas_mini.get_config()
  old = ml_collections.ConfigDict(c.to_dict())
  del old["protocol"]
  for f in (*protocol.FIELDS, *protocol.PARAMETERS):
    del old.evaluate[f.split(".", 1)[1]]
  ctx = types.SimpleNamespace(pipe=types.SimpleNamespace(weights_hash=lambda: "w"), judge=None, by_block={})
  sections = ("model", "block", "style_block", "sampler", "concepts", "evaluate")
  assert evaluate.fingerprint(c, ctx) == runs.make(old, sections, evaluate.NOT_RESULT,
                                                   {"weights": "w", "judge": "NoneType"}, stage="evaluate")
  plain = lambda cfg: {s: ml_collections.ConfigDict(cfg.to_dict()) for s in pipeline.STAGES}  # noqa: E731
  assert pipeline.fingerprints(plain(c)) == pipeline.fingerprints(plain(old))
  # On released the resolved values are recorded.
  r = sd15.get_config()
  assert evaluate.fingerprint(r, ctx)["settings"]["evaluate.kept_error"] == "xhat_minus_x"


# ------------------------------------------------------------------ 2: prompts


def test_released_prompts():
  """"An image of {object} in {style} style." (style underscores as spaces) and
  "An image of {object}." for the unstyled image; no Seed Images prompt."""
  from saemnesia_jax import collect
  c = sd15.get_config()
  # The collection's overlap check judges against the evaluation's prompts: the
  # old concept-grid collection at seed 188 hits none of the released ones.
  c.collect.update(dict(anchor_prompts_dir="", seeds=(188,), seed_stride=0))
  grid_c, trajs = collect.plan(c)
  assert collect.evaluation_overlap(c, grid_c, trajs) == []
  from saemnesia_jax.evaluation import protocol
  grid = protocol.evaluation_grid(c)
  prompts = [p.prompt for p in grid]
  assert len(grid) == 20 * 50 + 20
  assert "An image of Dogs in Van Gogh style." in prompts and "An image of Bears in Artist Sketch style." in prompts
  unstyled = [p for p in grid if p.style_id == -1]
  assert [p.prompt for p in unstyled][:2] == ["An image of Architectures.", "An image of Bears."]
  assert not any("Seed Images" in p or "_" in p for p in prompts)
  c.protocol = "project"
  assert len(collect.evaluation_overlap(c, grid_c, trajs)) == 1000


# ------------------------------------------ 3 and 4: noise and the judged images


def _fake_unit_run(config, monkeypatch, n_prompts=3):
  """Evaluation.run_unit of the no-erasure method with the sampler and the judge
  replaced: returns the seeds the sampler got, the images made, the images judged."""
  from saemnesia_jax.diffusion import sampler as sampler_mod
  seen = {}
  rng = np.random.default_rng(0)

  def sample_prompts(sampler, prompts, seeds, guidance, edit_params=None, progress=True):
    seen["seeds"] = list(seeds)
    seen["made"] = rng.uniform(0, 1, (len(prompts), 16, 16, 3)).astype(np.float32)
    return seen["made"]

  class Judge:
    def predict(self, images):
      seen["judged"] = np.asarray(images)
      return np.zeros(len(images), np.int32), np.zeros(len(images), np.int32)

  monkeypatch.setattr(sampler_mod, "sample_prompts", sample_prompts)
  ctx = evaluate.Evaluation.__new__(evaluate.Evaluation)
  ctx.config, ctx.judge = config, Judge()
  ctx.prompts = [f"p{i}" for i in range(n_prompts)]
  ctx.true_obj = ctx.true_sty = np.zeros(n_prompts, np.int32)
  ctx._identity = {"k": 2, "params": None}
  ctx.max_latents = 4
  ctx.sampler = lambda *a, **k: types.SimpleNamespace(timesteps=np.arange(3))
  ctx.run_unit({"phase": "sweep", "method": "none", "seeds": [188, 288]})
  return seen


def test_released_noise_is_fresh_for_every_image_of_a_seed(monkeypatch):
  seen = _fake_unit_run(_small("released"), monkeypatch)
  assert len(set(seen["seeds"])) == 6  # 3 prompts x 2 seeds, each its own noise
  again = _fake_unit_run(_small("released"), monkeypatch)
  assert again["seeds"] == seen["seeds"]  # the same noise in every erasure of those seeds
  project = _fake_unit_run(_small("project"), monkeypatch)
  assert project["seeds"] == [188, 288] * 3  # one noise per seed, shared by its prompts


def test_released_judge_sees_the_jpeg_at_pils_default_quality(monkeypatch):
  seen = _fake_unit_run(_small("released"), monkeypatch)

  def as_released(img):  # diffusers' numpy_to_pil, then img.save(path.jpg) with no options, then Image.open
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype("uint8")).save(buf, format="JPEG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32) / 255
  np.testing.assert_array_equal(seen["judged"], np.stack([as_released(i) for i in seen["made"]]))
  assert np.abs(seen["judged"] - seen["made"]).max() > 0.05
  np.testing.assert_array_equal(_fake_unit_run(_small("project"), monkeypatch)["judged"], seen["made"])


# ---------------------------------------------------------------- 4: the metrics


def _answer_set(n_obj, n_sty, seeds, rng):
  """Every (style, object, seed) image, then every (object, seed) unstyled image, with
  random predictions (the evaluation's layout: prompt-major, seeds inner)."""
  rows = [(o, s, seed) for o in range(n_obj) for s in range(n_sty) for seed in seeds]
  rows += [(o, -1, seed) for o in range(n_obj) for seed in seeds]
  t_obj = np.array([r[0] for r in rows])
  t_sty = np.array([r[1] for r in rows])
  p_obj = np.where(rng.uniform(size=len(rows)) < 0.7, t_obj, rng.integers(0, n_obj, len(rows)))
  p_sty = np.where(rng.uniform(size=len(rows)) < 0.7, t_sty, rng.integers(0, n_sty, len(rows)))
  return rows, t_obj, t_sty, p_obj, p_sty


def _released_accuracy(rows, p_obj, p_sty, n_obj, n_sty, seeds, domain):
  """SAeUron's accuracy scripts, re-expressed: the image lists they build and
  correct / count per class (accuracy_unlearncanvas_cls_fast.py for an object
  erasure, accuracy_unlearncanvas_fast.py for a style erasure)."""
  at = {r: i for i, r in enumerate(rows)}
  style_list, class_list = [], []
  for s in range(n_sty):
    for seed in seeds:
      for o in range(n_obj):
        style_list.append((at[(o, s, seed)], s))
        if domain == "object":
          class_list.append((at[(o, s, seed)], o))
          if (at[(o, -1, seed)], o) not in class_list:
            class_list.append((at[(o, -1, seed)], o))
        else:
          class_list.append((at[(o, -1, seed)], o))  # the unstyled file, once per style
  acc_sty = {s: np.mean([p_sty[i] == s for i, lab in style_list if lab == s]) for s in range(n_sty)}
  acc_obj = {o: np.mean([p_obj[i] == o for i, lab in class_list if lab == o]) for o in range(n_obj)}
  return acc_obj, acc_sty


def test_released_metrics_count_the_images_the_accuracy_scripts_count():
  """avg_accuracy_cls.py / avg_accuracy_style.py: UA = 1 - acc(c), IRA = mean over
  the others, CRA = mean over the other domain; a style erasure's CRA is the
  object accuracy on the unstyled images only."""
  from saemnesia_jax.evaluation import plan
  n_obj, n_sty, seeds = 3, 4, (188, 288)
  c = _small("released")
  rows, t_obj, t_sty, p_obj, p_sty = _answer_set(n_obj, n_sty, seeds, np.random.default_rng(3))
  result = {"true_object": t_obj.tolist(), "true_style": t_sty.tolist(), "pred_object": p_obj.tolist(),
            "pred_style": p_sty.tolist()}
  for domain, names in (("object", c.concepts.objects), ("style", c.concepts.styles)):
    acc_obj, acc_sty = _released_accuracy(rows, p_obj, p_sty, n_obj, n_sty, seeds, domain)
    acc_in, acc_x = (acc_obj, acc_sty) if domain == "object" else (acc_sty, acc_obj)
    for cid, name in enumerate(names):
      want = {"UA": 1 - acc_in[cid], "IRA": np.mean([a for k, a in acc_in.items() if k != cid]),
              "CRA": np.mean(list(acc_x.values()))}
      assert plan.unit_metrics(result, domain, [name], c) == pytest.approx(want), (domain, name)
  # The project's style CRA counts every image: another number on this answer set.
  got = plan.unit_metrics(result, "style", ["Cartoon"], _small("project"))["CRA"]
  acc_obj, _ = _released_accuracy(rows, p_obj, p_sty, n_obj, n_sty, seeds, "style")
  assert got != pytest.approx(np.mean(list(acc_obj.values())))


# ------------------------------------------------------- 5: SAeUron's style setting


def test_released_saeuron_styles_take_one_fixed_setting_and_objects_the_3_x_7_grid():
  from saemnesia_jax.evaluation import plan
  c = sd15.get_config()
  assert plan.settings(c, "saeuron", domain="style") == [{"percentile": 99.999, "gamma": -1.0}]
  grid = plan.settings(c, "saeuron", domain="object")
  assert len(grid) == 21 and {s["percentile"] for s in grid} == {99.99, 99.995, 99.999}
  assert sorted({s["gamma"] for s in grid}) == [-30.0, -25.0, -20.0, -15.0, -10.0, -5.0, -1.0]
  c.evaluate.update(dict(methods=("none", "saeuron"), objects=("Bears",), styles=("Van_Gogh", "Winter")))
  units = plan.sweep_units(c)
  assert {u.get("domain") for u in units if u["method"] == "saeuron"} == {"object"}  # styles are not swept
  rows, t_obj, t_sty, p_obj, p_sty = _answer_set(20, 50, (42,), np.random.default_rng(0))
  answers = {"true_object": t_obj.tolist(), "true_style": t_sty.tolist(), "pred_object": p_obj.tolist(),
             "pred_style": p_sty.tolist()}
  read = []
  results = types.SimpleNamespace(read=lambda u: read.append(u) or answers)
  chosen = plan.choose(c, results)
  assert chosen[("saeuron", "style", "Van_Gogh")] == chosen[("saeuron", "style", "Winter")] == \
      {"percentile": 99.999, "gamma": -1.0}
  assert {u["domain"] for u in read} == {"object"} and len(read) == 21  # one sweep seed (42) per trial
  c.protocol = "project"  # the project sweeps styles as objects
  assert {u.get("domain") for u in plan.sweep_units(c) if u["method"] == "saeuron"} == {"object", "style"}


# ------------------------------------- 1 and 11: SAEmnesia's selection, the kept error


def _topk_codes(params, x, k):
  pre = np.maximum((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0)
  z = np.zeros_like(pre)
  top = np.argsort(-pre, axis=1)[:, :k]
  np.put_along_axis(z, top, np.take_along_axis(pre, top, 1), 1)
  return z


def _released_hook(D, c, percentile, multiplier, x, params, k, t):
  """SAEmnesia's utils/hooks.py SAEMaskedUnlearningHook (and SAE/unlearning_utils.py's
  compute_feature_importance, get_percentile_threshold) at timestep t on tokens x:
  the latents it edits, their scale and threshold, and the block output."""
  mean_x = D[c][:, t].astype(np.float32).mean(0)
  mean_o = np.concatenate([D[s][:, t] for s in D if s != c]).astype(np.float32).mean(0)
  score = mean_x / (mean_x.sum() + 1e-8) - mean_o / (mean_o.sum() + 1e-8)
  idx = np.where(score > np.quantile(score, percentile / 100))[0]
  scaling = D[c][:, t, idx].mean(0) * multiplier
  tau = sum(D[s][:, t, idx].mean(0) for s in D) / len(D)
  z = _topk_codes(params, x, k)
  dec = lambda codes: codes @ params["W_dec"] + params["b_dec"]  # noqa: E731
  err = dec(z) - x
  z_edit = z.copy()
  sel = z[:, idx]
  z_edit[:, idx] = np.where(sel > tau, sel * scaling, sel)
  return idx, scaling, tau, dec(z_edit) + err


def _sae(rng, d=6, L=40):
  return {"W_enc": rng.normal(size=(d, L)).astype(np.float32), "b_enc": np.zeros(L, np.float32),
          "W_dec": rng.normal(size=(L, d)).astype(np.float32) / 3, "b_dec": rng.normal(size=d).astype(np.float32)}


def test_released_saemnesia_selects_by_the_percentile_hook_on_the_supervised_sae():
  """Per step: the latents whose score is above np.percentile(score, p) (strict >),
  scaled by gamma * mu_c, at tokens above the mean over concepts; not the trained latent."""
  import jax.numpy as jnp
  from saemnesia_jax.diffusion import clamp
  from saemnesia_jax.evaluation import plan
  from saemnesia_jax.sae import importance as imp
  rng = np.random.default_rng(5)
  n_prompts, S, L, k = 5, 4, 40, 8
  objects, styles = ("Bears", "Cats", "Dogs"), ("Van_Gogh", "Cartoon")
  D = {o: rng.uniform(0, 1, (n_prompts, S, L)).astype(np.float32) for o in objects}  # map-mean codes per prompt
  c = _small("released", objects=objects, styles=styles, saemnesia_percentiles=(95.0,), gammas=(-5.0,))
  (setting,) = plan.settings(c, "saemnesia")
  assert setting == {"percentile": 95.0, "gamma": -5.0}
  mu = np.stack([D[o].mean(0) for o in objects])
  counts = np.full(mu.shape[:2], float(n_prompts), np.float32)
  sty = rng.uniform(0, 1, (len(styles), S, L)).astype(np.float32)
  tables = {"mu_objects": mu, "scores_objects": np.asarray(imp.importance_scores(jnp.asarray(mu), jnp.asarray(counts))),
            "threshold_objects": np.asarray(imp.clamp_threshold(jnp.asarray(mu))), "mu_styles": sty,
            "scores_styles": sty, "threshold_styles": sty.mean(0), "timesteps": np.arange(S)[::-1] * 10,
            "assignment": np.array([0, 1, 2, 3, 4], np.int32)}
  ctx = evaluate.Evaluation.__new__(evaluate.Evaluation)
  ctx.objects, ctx.styles = list(objects), list(styles)
  ctx.methods = {"saemnesia": {"scores": tables, "assignment": None}}  # released: no trained assignment read
  ctx.domain_block, ctx.by_block = {"object": "b", "style": "b"}, {"b": ctx.methods}
  entry = ctx.entry("saemnesia", "object", "Cats", setting)
  spec = clamp.build_spec([entry], tables["timesteps"], tables["timesteps"], max_latents=16)
  params = _sae(rng, L=L)
  x = rng.normal(size=(12, 6)).astype(np.float32) * 3
  edited = 0
  for t in range(S):
    idx, scaling, tau, out = _released_hook(D, "Cats", 95.0, -5.0, x, params, k, t)
    on = spec.active[t]
    assert sorted(spec.latents[on].tolist()) == sorted(idx.tolist()) and len(idx) == 2
    order = [spec.latents.tolist().index(i) for i in idx]
    np.testing.assert_allclose(spec.multiplier[t, order], scaling, rtol=1e-5)
    np.testing.assert_allclose(spec.threshold[t, order], tau, rtol=1e-5)
    got = np.asarray(clamp.clamp(params, spec, jnp.asarray(x), jnp.int32(t), k, kept_error="xhat_minus_x"))
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4)
    edited += int((_topk_codes(params, x, k)[:, idx] > tau).sum())
  assert edited > 0  # the hand-made tokens do cross the threshold


def test_released_block_output_keeps_xhat_minus_x(monkeypatch):
  """hooks.py: err = recon - x; output = decode(z_edit) + err, so an empty edit
  gives 2 x_hat - x. The evaluation's erasing sampler runs it; the no-erasure one
  stays the plain model."""
  import jax.numpy as jnp
  from saemnesia_jax.diffusion import clamp
  from saemnesia_jax.diffusion import setup as common
  made = []
  monkeypatch.setattr(common, "make_sampler", lambda config, pipe, edit_fn=None, **kw: made.append(edit_fn) or edit_fn)
  rng = np.random.default_rng(7)
  params, k = _sae(rng), 3
  x = rng.normal(size=(2, 3, 6)).astype(np.float32) * 2
  z = _topk_codes(params, x.reshape(-1, 6), k)
  x_hat = (z @ params["W_dec"] + params["b_dec"]).reshape(x.shape)
  spec = clamp.empty_spec(2, 4)
  for protocol_name, sae_dtype, want, tol in (("released", "float32", 2 * x_hat - x, 1e-5),
                                              ("released", "", 2 * x_hat - x, 3e-2),  # the release's float16 SAE
                                              ("project", "", x, 0)):
    ctx = evaluate.Evaluation.__new__(evaluate.Evaluation)
    ctx.config = _small(protocol_name, sae_dtype=sae_dtype)
    ctx.config.sampler.num_steps = 2
    ctx.config.evaluate.num_steps = 0
    ctx.pipe, ctx._samplers = None, {}
    edit = ctx.sampler(k, "b")
    np.testing.assert_allclose(np.asarray(edit((params, spec), jnp.asarray(x), jnp.int32(0))), want, atol=tol)
    plain = ctx.sampler(k, "b", erasing=False)  # no erasure: the plain model's block output
    np.testing.assert_array_equal(np.asarray(plain((params, spec), jnp.asarray(x), jnp.int32(0))), x)


def test_released_precision_is_float16_sampling_and_sae():
  from saemnesia_jax.evaluation import protocol
  c = sd15.get_config()
  assert c.model.dtype == "bfloat16"  # the project's store and training precision
  assert protocol.sampling_model(c).model.dtype == "float16"  # the released pipelines (torch_dtype=float16)
  assert protocol.value(c, "evaluate.sae_dtype") == "float16"  # load_sae: sae.to(float16)
  c.protocol = "project"
  assert protocol.sampling_model(c) is c and protocol.value(c, "evaluate.sae_dtype") == "float32"
