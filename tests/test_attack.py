"""The adversarial prefix attack (diffusion/adversarial.py, stage attack) on the tiny pipeline.

One module-scoped pipeline, SAE and attack: every library test reuses one compiled step,
objective and gradient; the stage tests share one loaded context (attack._context)."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax import attack as attack_stage
from saemnesia_jax.diffusion import adversarial as adv
from saemnesia_jax.diffusion import clamp, models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec, sample_prompts
from saemnesia_jax.runtime import layout
from saemnesia_jax.sae import model as sae_lib
from saemnesia_jax.sae import sparsify_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

BLOCK = "up_blocks.1.attentions.1"
PROMPT = "A cat image in neon style."


class StubJudge:
  """Object = brighter or darker half, style = redder or bluer half (the tiny model draws no concepts)."""

  def predict(self, images):
    x = np.asarray(images)
    obj = (x.mean((1, 2, 3)) > 0.5).astype(np.int32)
    sty = (x[..., 0].mean((1, 2)) > x[..., 2].mean((1, 2))).astype(np.int32)
    return obj, sty


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
  """A tiny pipeline, a clamp sampler, an SAE with a clamp that edits, targets and one compiled attack."""
  work = tmp_path_factory.mktemp("attack")
  pipe = models.load_pipeline(tiny_lib.write_tiny_pipeline(str(work / "tiny"), seed=0))
  s = Sampler(pipe, SamplerSpec(num_steps=3, batch_size=2, edit_block=BLOCK), clamp.make_edit_fn(k=8))
  params = {k: np.asarray(v) for k, v in sae_lib.init_params(jax.random.PRNGKey(0), 64, 128).items()}
  got = []
  sample_prompts(s, [PROMPT] * 2, [7, 8], 7.0, edit_params=(params, clamp.empty_spec(3, 4)), progress=False,
                 on_batch=lambda i, o: got.append(np.asarray(o.latents)))
  # A clamp that edits: four latents, no threshold, gamma * mu = -5, at every step.
  spec = clamp.ClampSpec(np.arange(4, dtype=np.int32), np.ones((3, 4), bool), np.full((3, 4), -5.0, np.float32),
                         np.zeros((3, 4), np.float32))
  atk = adv.PrefixAttack(s, 3, learning_rate=0.05, weight_decay=0.0, check_timesteps=3)
  ids = adv.with_prefix(pipe.tokenize([PROMPT])[0], [4, 4, 4], pipe.tokenizer.pad_token_id)[None]
  return dict(work=work, pipe=pipe, sampler=s, params=params, spec=spec, x0=np.concatenate(got), atk=atk, ids=ids)


def test_the_attack_lowers_its_own_objective(lib):
  pipe, atk = lib["pipe"], lib["atk"]
  ep = (lib["params"], lib["spec"])
  key = jax.random.PRNGKey(1)
  soft = atk.run(pipe.params, ep, lib["ids"], lib["x0"], [5, 6, 7], 6, key, check_every=2, project=False)
  assert soft.best_objective < soft.initial_objective  # the soft prompt: plain gradient descent
  hard = atk.run(pipe.params, ep, lib["ids"], lib["x0"], [5, 6, 7], 6, key, check_every=2, project=True)
  assert hard.best_objective <= hard.initial_objective and len(hard.checks) == 4
  assert atk.n_traces == 1  # both runs (and both modes) through one compiled step


def test_projection_keeps_every_token_in_the_vocabulary(lib):
  pipe, atk = lib["pipe"], lib["atk"]
  table = adv.token_table(pipe.params)
  allowed = np.asarray(atk.allowed)
  assert not allowed[pipe.tokenizer.all_special_ids].any() and allowed.sum() == table.shape[0] - 4
  e = jax.random.normal(jax.random.PRNGKey(3), (50, table.shape[1])) * 0.1
  tok = np.asarray(adv.nearest_tokens(e, table, atk.allowed))
  assert allowed[tok].all()
  ok = np.flatnonzero(allowed)
  np.testing.assert_array_equal(np.asarray(adv.nearest_tokens(table[ok], table, atk.allowed)), ok)
  r = atk.run(pipe.params, (lib["params"], lib["spec"]), lib["ids"], lib["x0"], [5, 6, 7], 3,
              jax.random.PRNGKey(2), check_every=1)
  assert allowed[r.tokens].all() and r.tokens.shape == (3,)
  ids = adv.with_prefix(pipe.tokenize([PROMPT])[0], r.tokens, pipe.tokenizer.pad_token_id)
  assert ids[0] == pipe.tokenizer.bos_token_id and list(ids[1:4]) == r.tokens.tolist()
  assert (ids == pipe.tokenizer.eos_token_id).sum() == 1  # the prompt's end survives
  with pytest.raises(ValueError, match="do not fit"):
    adv.with_prefix(pipe.tokenize([PROMPT])[0], [5] * 10, pipe.tokenizer.pad_token_id)


def test_gradient_through_the_clamp_matches_finite_differences(lib):
  # The clamp alone (it computes in float32 whatever its input): d/dx sum(w * clamp(x)) against a central
  # difference. The clamp is piecewise linear in x, so away from a TopK or threshold switch the difference
  # is exact up to rounding.
  rng = np.random.default_rng(0)
  p = sae_lib.init_params(jax.random.PRNGKey(4), 8, 16)
  spec = clamp.ClampSpec(np.array([0, 3, 5], np.int32), np.ones((1, 3), bool), np.full((1, 3), -4.0, np.float32),
                         np.zeros((1, 3), np.float32))
  spec = jax.tree_util.tree_map(jnp.asarray, spec)
  x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  f = jax.jit(lambda x: jnp.sum(w * clamp.clamp(p, spec, x, jnp.int32(0), k=4)))
  v = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  g = float(jnp.vdot(jax.grad(f)(x), v))
  fd = (float(f(x + 1e-3 * v)) - float(f(x - 1e-3 * v))) / 2e-3
  assert g == pytest.approx(fd, rel=2e-3)
  assert abs(g - float(jnp.vdot(w, v))) > 1e-2  # the clamp is not the identity here
  # The attack's loss (text encoder, UNet with the clamp) in float32: a directional derivative against a
  # central difference. The clamp jumps where a selected latent enters or leaves a token's top k, so the
  # step is small and the input fixed (a random x0, as a hand-made case).
  pipe, atk = lib["pipe"], lib["atk"]
  spec = jax.tree_util.tree_map(jnp.asarray, lib["spec"])
  ids = jnp.asarray(lib["ids"])
  x0 = jax.random.normal(jax.random.PRNGKey(9), lib["x0"].shape)
  e = adv.token_table(pipe.params)[jnp.asarray([5, 6, 7])]
  steps = jnp.asarray([1])
  noise = jax.random.normal(jax.random.PRNGKey(5), (1, *x0.shape))
  loss = jax.jit(lambda e, spec: adv.denoise_loss(lib["sampler"], pipe.params, (lib["params"], spec), ids, e, x0,
                                                  steps, noise, remat=True))
  d = jax.random.normal(jax.random.PRNGKey(6), e.shape)
  d = d / jnp.linalg.norm(d) * jnp.linalg.norm(e)
  h = 1e-2
  grad = jax.jit(jax.grad(loss))
  for sp in (spec, jax.tree_util.tree_map(jnp.asarray, clamp.empty_spec(3, 4))):
    fd = (float(loss(e + h * d, sp)) - float(loss(e - h * d, sp))) / (2 * h)
    assert float(jnp.vdot(grad(e, sp), d)) == pytest.approx(fd, rel=0.02)
  assert abs(float(loss(e, spec)) - float(loss(e, clamp.empty_spec(3, 4)))) > 1e-3  # the clamp acts


# ------------------------------------------------------------------ the stage


def _write_method(root, mode, params, k, n_obj, n_sty, steps):
  """An SAE export (sparsify layout + saemnesia.json) and its scores folder, made by hand."""
  export = os.path.join(root, "export")
  sparsify_io.save_sparsify(params, {"k": k}, export)
  L = params["W_enc"].shape[1]
  with open(os.path.join(export, "saemnesia.json"), "w") as f:
    json.dump({"mode": mode, "block": BLOCK, "assignment": list(range(n_obj + n_sty))}, f)
  rng = np.random.default_rng(0)
  scores = os.path.join(root, "scores")
  os.makedirs(scores)
  np.savez(os.path.join(scores, "scores.npz"), timesteps=np.asarray(steps),
           mu_objects=np.abs(rng.standard_normal((n_obj, len(steps), L))).astype(np.float32),
           mu_styles=np.abs(rng.standard_normal((n_sty, len(steps), L))).astype(np.float32),
           scores_objects=rng.random((n_obj, len(steps), L)).astype(np.float32),
           scores_styles=rng.random((n_sty, len(steps), L)).astype(np.float32),
           threshold_objects=np.zeros((len(steps), L), np.float32),
           threshold_styles=np.zeros((len(steps), L), np.float32),
           assignment=np.arange(n_obj + n_sty, dtype=np.int32))
  with open(os.path.join(scores, "manifest.json"), "w") as f:
    json.dump({"by": "test_attack"}, f)


def _config(lib):
  work = lib["work"]
  c = tiny.get_config()
  c.workdir = str(work / "run")
  c.model.path = lib["pipe"].path
  c.sampler.update(dict(num_steps=3, batch_size=2))
  c.evaluate.update(dict(eval_seeds=(188,), max_latents=4))
  c.attack.update(dict(methods=("none", "saemnesia"), objects=("cat",), styles=("neon",), prompts=1, steps=2,
                       check_every=1, check_timesteps=3, target_seeds=(7, 8), learning_rate=0.05,
                       chosen_from=str(work / "chosen.json")))
  if not (work / "chosen.json").exists():
    params = {k: np.asarray(v) for k, v in sae_lib.init_params(jax.random.PRNGKey(0), 64, 128).items()}
    for run, mode in (("sae_unsup", "unsupervised"), ("sae_sup", "supervised")):
      _write_method(os.path.join(c.workdir, run), mode, params, 8, 2, 2, lib["sampler"].timesteps)
    (work / "chosen.json").write_text(json.dumps({"saemnesia/object/cat": {"gamma": -5.0},
                                                          "saemnesia/style/neon": {"gamma": -5.0}}))
  return c


def test_an_interrupted_attack_resumes_to_the_uninterrupted_result(lib, tmp_path):
  c = _config(lib)
  judge = StubJudge()
  c.attack.out_dir = str(tmp_path / "whole")
  whole = attack_stage.run(c, judge=judge, progress=False)
  for name in ("summary.json", "table.md", "prompts.json", "grid.png"):
    assert (tmp_path / "whole" / name).exists(), name
  assert set(whole["methods"]) == {"none", "saemnesia"}
  row = whole["per_concept"][0]
  lo, hi = row["ASR_ci"]
  assert lo <= row["ASR"] <= hi and row["UA_after"] == pytest.approx(1 - row["ASR"])
  prompts = json.loads((tmp_path / "whole" / "prompts.json").read_text())
  assert all(t.endswith(" | " + PROMPT) for ts in prompts.values() for t in ts)
  # Interrupted after one unit (attack.stop_after, as a kill leaves the folder), then rerun.
  c.attack.out_dir = str(tmp_path / "cut")
  c.attack.stop_after = 1
  assert attack_stage.run(c, judge=judge, progress=False) is None
  assert len(list((tmp_path / "cut" / "units" / "units").glob("*.json"))) == 1  # of 4
  c.attack.stop_after = 0
  resumed = attack_stage.run(c, judge=judge, progress=False)
  assert resumed["per_concept"] == whole["per_concept"] and resumed["methods"] == whole["methods"]
  assert json.loads((tmp_path / "cut" / "prompts.json").read_text()) == prompts
  # Other attack settings in the same folder: refused, naming the field.
  c.attack.steps = 3
  with pytest.raises(Exception, match="attack.steps"):
    attack_stage.run(c, judge=judge, progress=False)


def test_dry_run_compiles_the_attack_step_from_config_files(lib):
  c = _config(lib)
  c.dry_run = True
  out = attack_stage.run(c, progress=False)
  a = out["program"]
  assert out["stage"] == "attack" and a["per_device_bytes"]["temporaries"] > 0 and a["flops_per_device"] > 0
  assert out["weights_bytes"] > 0 and a["fits"] is None  # the local CPU: no HBM to fit
  with open(layout.dry_run_file(c.workdir, "attack")) as f:
    assert json.load(f)["program"]["flops_per_device"] == a["flops_per_device"]
