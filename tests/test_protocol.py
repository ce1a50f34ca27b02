"""The UnlearnCanvas protocol as configs/sd15.py states it: each test pins one
setting of the published protocol (evaluation steps, prompts, answer set,
sequential range, trained assignment, blocks, collection, training budget)."""
import os
import sys

import ml_collections
import numpy as np
import pytest

from saemnesia_jax import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import canvas_mini  # noqa: E402
import sd15  # noqa: E402


# ---------------------------------------------------------- 7: sequential


def test_sequential_unlearning_reaches_the_papers_nine_objects():
  """SAEmnesia's +28.4% UA claim is at 9 objects erased at once."""
  c = sd15.get_config()
  c.evaluate.methods = ("none", "saemnesia")
  chosen = {("saemnesia", "object", o): {"gamma": -1.0} for o in c.concepts.objects}
  units = evaluate.sequential_units(c, chosen)
  assert [u["n"] for u in units] == list(range(1, 10))
  assert units[-1]["objects"] == list(c.evaluate.sequential_objects)
  assert len(units[-1]["erase"]) == 9


def test_sequential_over_every_object_keeps_one_for_ira():
  """CanvasMini's order is every object: the last point keeps one (IRA needs it)."""
  c = canvas_mini.get_config()
  c.evaluate.methods, c.evaluate.sequential = ("saeuron",), True  # the shipped config's Table 1 run skips it
  chosen = {("saeuron", "object", o): {} for o in c.concepts.objects}
  assert [u["n"] for u in evaluate.sequential_units(c, chosen)] == list(range(1, len(c.concepts.objects)))


# ------------------------------------------------ 1: the trained assignment


def _ctx_with_assignments(trained, rescored, n_obj=2, n_sty=2, n_steps=3, n_latents=8):
  """An Evaluation holding only what ``entry`` reads (no model)."""
  ctx = evaluate.Evaluation.__new__(evaluate.Evaluation)
  ctx.objects, ctx.styles = [f"o{i}" for i in range(n_obj)], [f"s{i}" for i in range(n_sty)]
  z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
  tables = {"mu_objects": z(n_obj, n_steps, n_latents), "mu_styles": z(n_sty, n_steps, n_latents),
            "threshold_objects": z(n_steps, n_latents), "threshold_styles": z(n_steps, n_latents),
            "assignment": np.asarray(rescored, np.int32)}
  ctx.methods = {"saemnesia": {"scores": tables, "assignment": np.asarray(trained, np.int32)}}
  ctx.domain_block, ctx.by_block = {"object": "b", "style": "b"}, {"b": ctx.methods}  # one block
  return ctx


def test_saemnesia_clamps_the_latent_it_was_trained_to_carry():
  """Not the latent the greedy rule picks again on the supervised SAE's scores."""
  trained, rescored = [5, 1, 7, 2], [0, 3, 4, 6]
  ctx = _ctx_with_assignments(trained, rescored)
  assert ctx.entry("saemnesia", "object", "o1", {"gamma": -1.0}).latents.tolist() == [1]
  assert ctx.entry("saemnesia", "style", "s0", {"gamma": -1.0}).latents.tolist() == [7]


def test_assignment_choice_and_its_errors():
  tables = {"assignment": np.array([3, 4], np.int32)}
  meta = {"assignment": [1, 2]}
  assert evaluate.saemnesia_assignment(meta, tables, "trained").tolist() == [1, 2]
  assert evaluate.saemnesia_assignment(meta, tables, "rescored").tolist() == [3, 4]
  with pytest.raises(ValueError, match="records no trained assignment"):
    evaluate.saemnesia_assignment({"mode": "unsupervised", "assignment": None}, tables, "trained")
  with pytest.raises(ValueError, match="saemnesia_assignment='x'"):
    evaluate.saemnesia_assignment(meta, tables, "x")
  from saemnesia_jax.runtime import config_defaults
  assert config_defaults.EVALUATE["saemnesia_assignment"] == "trained"


# ------------------------------------------------ 3: evaluation step count


def test_evaluation_samples_the_protocols_100_steps():
  c = sd15.get_config()
  assert c.sampler.num_steps == 50  # collection
  assert evaluate.sampling_config(c).sampler.num_steps == 100
  assert c.sampler.num_steps == 50  # the config itself is left alone
  mini = canvas_mini.get_config()  # 0: the sampler's own count, unchanged
  assert evaluate.sampling_config(mini).sampler.num_steps == mini.sampler.num_steps == 25
  mini.evaluate.num_steps = -1
  with pytest.raises(ValueError, match="evaluate.num_steps"):
    evaluate.sampling_config(mini)


# ------------------------------------ 2 and 6: prompts and the answer set


def test_prompts_write_style_names_with_spaces_as_the_benchmark():
  from saemnesia_jax.evaluation import concepts
  c = sd15.get_config()
  prompts = [p.prompt for p in concepts.evaluation_grid(c.concepts)]
  assert "A Dogs image in Van Gogh style." in prompts
  assert not any("_" in p for p in prompts)
  assert "Van_Gogh" in c.concepts.styles  # the class names keep theirs (the judge maps by name)
  assert not any("_" in p.prompt for p in concepts.prompt_grid(c.concepts))  # collection too


def test_answer_set_holds_the_unstyled_seed_images_prompts():
  from saemnesia_jax.evaluation import concepts
  c = sd15.get_config()
  grid = concepts.evaluation_grid(c.concepts, seed_images=c.evaluate.seed_images)
  n_obj, n_sty = len(c.concepts.objects), len(c.concepts.styles)
  assert len(grid) == n_obj * n_sty + n_obj == 1020
  unstyled = [p for p in grid if p.style_id == concepts.NO_STYLE]
  assert [p.object_id for p in unstyled] == list(range(n_obj))
  assert unstyled[1].prompt == "A Bears image in Seed Images style."
  # Object accuracy counts them, style accuracy leaves them out.
  from saemnesia_jax.evaluation import metrics
  t_obj = np.array([p.object_id for p in grid])
  t_sty = np.array([p.style_id for p in grid])
  p_obj = np.where(t_sty == concepts.NO_STYLE, (t_obj + 1) % n_obj, t_obj)  # every unstyled image wrong
  m = metrics.erasure_metrics(t_obj, t_sty, p_obj, t_sty, ["Bears"], "object",
                              object_names=list(c.concepts.objects), style_names=list(c.concepts.styles))
  assert m["UA"] == pytest.approx(1 / (n_sty + 1)) and m["CRA"] == 1.0


# ------------------------------------------------- 8: the training budget


@pytest.fixture(scope="module")
def concept_store(tmp_path_factory):
  from synthetic import make_concept_store
  path = tmp_path_factory.mktemp("store") / "acts"
  make_concept_store(path, seeds=8)
  return str(path)


def _train_config(workdir, store_path, **train):
  import tiny
  from synthetic import BLOCK
  c = tiny.get_config()
  c.workdir, c.block = str(workdir), BLOCK
  c.collect.store_path = store_path
  c.sae.update(dict(expansion_factor=4, k=4, dead_tokens=64))
  c.train.update(dict(steps=8, batch_size=32, log_every=2, eval_every=2, ckpt_every=4, val_fraction=0.2,
                      val_batches=2, learning_rate=3e-3, check_model=False))
  c.train.update(train)
  return c


def test_budget_in_epochs_of_the_collected_store(concept_store, tmp_path, capsys):
  from saemnesia_jax import store, train
  c = _train_config(tmp_path, concept_store, epochs=2.5)
  st = store.open_store(concept_store)
  reader = store.TokenBatches(st, 32, split="train", val_fraction=0.2, split_seed=0, shuffle=False, prefetch=False)
  per_epoch = reader.batches_per_epoch()
  assert per_epoch > 1
  resolved = train.with_epoch_steps(c)
  assert resolved.train.steps == int(np.ceil(2.5 * per_epoch))
  assert "-> train.steps=" in capsys.readouterr().out
  assert c.train.steps == 8  # the caller's config is left alone
  sup = _train_config(tmp_path, concept_store, epochs=1.0, batch_size=4)
  sup.sae.mode = "supervised"  # epochs count maps
  maps = store.MapBatches(st, 4, split="train", val_fraction=0.2, split_seed=0, shuffle=False, prefetch=False)
  assert train.with_epoch_steps(sup).train.steps == maps.batches_per_epoch()
  assert train.with_epoch_steps(_train_config(tmp_path, concept_store)).train.steps == 8  # epochs 0: steps


def test_sd15_budgets_are_epochs_and_only_the_supervised_run_stops_early():
  import sd15_sup
  unsup, sup = sd15.get_config(), sd15_sup.get_config()
  assert unsup.train.epochs == 5.0 and not unsup.train.early_stop
  assert sup.train.epochs == 150.0 and sup.train.early_stop and sup.train.patience == 5


def test_unsupervised_run_trains_its_full_schedule_and_exports_the_end(concept_store, tmp_path):
  """A validation loss that stops improving does not stop SAeUron's schedule;
  the export is the last step, not the best validation checkpoint."""
  import json
  from saemnesia_jax import train
  # A learning rate this high makes the validation loss worse after the first evaluations.
  c = _train_config(tmp_path / "full", concept_store, steps=12, patience=1, learning_rate=0.5)
  full = train.train(c, progress=False)
  assert full["step"] == 12 and not full["stopped_early"]
  meta = json.load(open(os.path.join(full["run_dir"], "export", "saemnesia.json")))
  assert meta["step"] == 12
  early = train.train(_train_config(tmp_path / "early", concept_store, steps=12, patience=1, learning_rate=0.5,
                                    early_stop=True), progress=False)
  assert early["stopped_early"] and early["step"] < 12


# ------------------------------------------ 4: collection apart from evaluation


def _anchor_dir(tmp_path, objects, lines=("A {o} on a boat", "A {o} in the rain.")):
  d = tmp_path / "anchors"
  d.mkdir(exist_ok=True)
  for o in objects:
    (d / f"sd_prompt_{o}.txt").write_text("\n".join(l.format(o=o.lower()) for l in lines) + "\n")
  return str(d)


def test_sd15_collects_anchor_prompts_apart_from_the_evaluation(tmp_path):
  from saemnesia_jax import collect
  from saemnesia_jax.evaluation import concepts
  c = sd15.get_config()
  c.collect.anchor_prompts_dir = _anchor_dir(tmp_path, c.concepts.objects)
  grid, trajs = collect.plan(c)
  n_obj, n_sty = len(c.concepts.objects), len(c.concepts.styles)
  assert len(grid) == n_obj * 2 * (n_sty + 2)  # each line in 50 styles, in Seed Images, plain
  assert grid[0].prompt == "A architectures on a boat in Abstractionism style."
  assert grid[n_sty].prompt == "A architectures on a boat in Seed Images style." and grid[n_sty].style_id == -1
  assert grid[n_sty + 1].prompt == "A architectures on a boat." and grid[n_sty + 1].style_id == -1
  van_gogh = n_sty + 2 + c.concepts.styles.index("Van_Gogh")  # the second line's styles
  assert grid[van_gogh].prompt == "A architectures in the rain in Van Gogh style."
  assert {p.object_id for p in grid[:2 * (n_sty + 2)]} == {0}
  seeds = [s for _, s in trajs]
  assert len(set(seeds)) == len(seeds)  # distinct noise per prompt
  judged = set(c.evaluate.eval_seeds) | set(c.evaluate.sweep_seeds)
  assert not judged & set(seeds)
  assert not {p.prompt for p in grid} & {p.prompt for p in concepts.evaluation_grid(c.concepts)}
  assert collect.evaluation_overlap(c, grid, trajs) == []
  c.collect.prompts_per_object = 1
  assert len(collect.plan(c)[0]) == n_obj * (n_sty + 2)


def test_collecting_the_images_the_evaluation_judges_is_refused(tmp_path):
  from saemnesia_jax import collect
  c = sd15.get_config()
  c.protocol = "project"  # the project's prompts are the concept grid's (released ones: test_released_prompts)
  c.collect.update(dict(anchor_prompts_dir="", seeds=(188,), seed_stride=0))  # the old sd15 collection
  grid, trajs = collect.plan(c)
  assert len(collect.evaluation_overlap(c, grid, trajs)) == 1000  # every styled prompt at seed 188
  with pytest.raises(ValueError, match="allow_eval_overlap"):
    collect.check_disjoint(c, grid, trajs)
  c.collect.allow_eval_overlap = True
  collect.check_disjoint(c, grid, trajs)
  with pytest.raises(FileNotFoundError, match="anchor_prompts_dir"):
    c.collect.anchor_prompts_dir = str(tmp_path)
    collect.plan(c)
  # The CLI's checks say so before the model loads (sd15's placeholder path).
  from saemnesia_jax.runtime import checks
  with pytest.raises(checks.ConfigError, match="has no sd_prompt_Architectures.txt .missing for 20 of 20"):
    checks.check("collect", sd15.get_config())


# ---------------------------------------------------- 5: a block per domain


def test_sd15_hooks_a_block_per_domain_with_a_folder_each():
  import sd15_sup
  from saemnesia_jax.diffusion import blocks
  from saemnesia_jax import collect
  c = sd15.get_config()
  assert blocks.domain_blocks(c) == {"object": "up_blocks.1.attentions.1", "style": "up_blocks.1.attentions.2"}
  obj, sty = (blocks.block_config(c, b) for b in blocks.blocks(c))
  assert collect.store_path(obj) == "runs/sd15/up_blocks.1.attentions.1/activations"
  assert collect.store_path(sty) == "runs/sd15/up_blocks.1.attentions.2/activations"
  assert (obj.block, sty.block) == ("up_blocks.1.attentions.1", "up_blocks.1.attentions.2")
  assert not blocks.per_block(obj) and not blocks.per_block(sty)  # a stage on one block does not loop again
  assert (obj.train.epochs, sty.train.epochs) == (5.0, 10.0)  # SAeUron's up.1.1 / up.1.2 schedules
  sup = sd15_sup.get_config()
  s_obj, s_sty = (blocks.block_config(sup, b) for b in blocks.blocks(sup))
  assert s_sty.sae.init_from == "runs/sd15/up_blocks.1.attentions.2/sae_unsup/export"
  assert s_sty.scores.sae_dir == "runs/sd15/up_blocks.1.attentions.2/sae_sup/export"
  assert s_obj.train.epochs == s_sty.train.epochs == 150.0
  c.collect.store_path = "/data/acts"  # one store for two blocks: refused
  with pytest.raises(ValueError, match="names no \\{block\\}"):
    blocks.block_config(c, "up_blocks.1.attentions.2")
  c.collect.store_path = "/data/acts/{block}"
  assert blocks.block_config(c, "up_blocks.1.attentions.2").collect.store_path == "/data/acts/up_blocks.1.attentions.2"
  mini = canvas_mini.get_config()  # one block: everything where it was
  assert blocks.blocks(mini) == [mini.block] and blocks.block_config(mini, mini.block) is mini


def _write_sae_and_scores(root, block, assignment, n_obj=2, n_sty=2, d_in=4, n_latents=8, steps=3):
  """A supervised SAE export and its scores under ``root`` (what train and scores write)."""
  import json
  from saemnesia_jax import scores
  from saemnesia_jax.sae import sparsify_io
  rng = np.random.default_rng(len(block))
  params = {"W_enc": rng.normal(size=(d_in, n_latents)).astype(np.float32), "b_enc": np.zeros(n_latents, np.float32),
            "W_dec": rng.normal(size=(n_latents, d_in)).astype(np.float32), "b_dec": np.zeros(d_in, np.float32)}
  export = os.path.join(root, "sae_sup", "export")
  sparsify_io.save_sparsify(params, {"k": 2}, export, overwrite=True)
  with open(os.path.join(export, "saemnesia.json"), "w") as f:
    json.dump({"mode": "supervised", "block": block, "assignment": list(assignment)}, f)
  out = os.path.join(root, "sae_sup", "scores")
  os.makedirs(out, exist_ok=True)
  z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
  np.savez(os.path.join(out, scores.SCORES_FILE), mu_objects=z(n_obj, steps, n_latents),
           mu_styles=z(n_sty, steps, n_latents), threshold_objects=z(steps, n_latents),
           threshold_styles=z(steps, n_latents), timesteps=np.arange(steps)[::-1], assignment=np.zeros(4, np.int32))
  with open(os.path.join(out, scores.MANIFEST_FILE), "w") as f:
    json.dump({}, f)


def test_evaluation_erases_objects_and_styles_with_their_own_blocks_sae(tmp_path):
  from saemnesia_jax.diffusion import blocks
  c = ml_collections.ConfigDict(dict(
      workdir=str(tmp_path), block="b.obj", style_block="b.sty",
      concepts=dict(objects=("o0", "o1"), styles=("s0", "s1")),
      evaluate=dict(methods=("none", "saemnesia"), saemnesia_sae="", saemnesia_scores="",
                    saemnesia_assignment="trained", saeuron_sae="", saeuron_scores="")))
  _write_sae_and_scores(str(tmp_path / "b.obj"), "b.obj", [1, 2, 3, 4])
  _write_sae_and_scores(str(tmp_path / "b.sty"), "b.sty", [5, 6, 7, 0])
  ctx = evaluate.Evaluation.__new__(evaluate.Evaluation)
  ctx.config, ctx.objects, ctx.styles = c, ["o0", "o1"], ["s0", "s1"]
  ctx.domain_block = blocks.domain_blocks(c)
  ctx.by_block = {b: ctx._load_methods(blocks.block_config(c, b), b) for b in blocks.blocks(c)}
  ctx.methods = ctx.by_block["b.obj"]
  assert ctx.entry("saemnesia", "object", "o1", {"gamma": -1.0}).latents.tolist() == [2]
  assert ctx.entry("saemnesia", "style", "s0", {"gamma": -1.0}).latents.tolist() == [7]  # the style block's SAE
  assert ctx.sae("saemnesia", "style") is ctx.by_block["b.sty"]["saemnesia"]
  # An SAE of another block is refused.
  _write_sae_and_scores(str(tmp_path / "b.sty"), "b.obj", [5, 6, 7, 0])
  with pytest.raises(ValueError, match="trained at block 'b.obj'"):
    ctx._load_methods(blocks.block_config(c, "b.sty"), "b.sty")
