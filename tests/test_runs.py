"""Run identity: a rerun under other settings is refused (or, for more steps,
continues and says so), metrics hold each step once, and bad values fail
before any file is written."""
import json
import os
import sys

import pytest

from saemnesia_jax.runtime import checks
from saemnesia_jax.runtime import runs
from saemnesia_jax import train
from saemnesia_jax.runtime.errors import ConfigError, RunMismatchError
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
  c.sae.expansion_factor = 4  # 64 latents for d_in 16
  c.sae.k = 4
  c.train.update(dict(steps=6, batch_size=32, log_every=1, eval_every=3, ckpt_every=3, val_fraction=0.2,
                      val_batches=1, learning_rate=3e-3))
  c.train.update(train_overrides)
  return c


@pytest.fixture(scope="module")
def finished(store_path, tmp_path_factory):
  """A finished run and a half-finished one (stopped after 4 of 6 steps)."""
  work = tmp_path_factory.mktemp("work")
  train.train(_config(work, store_path), progress=False)
  train.train(_config(work, store_path, name="half", stop_after=4), progress=False)
  return work


@pytest.mark.parametrize("name", ["sae_unsup", "half"])
@pytest.mark.parametrize("field,value,shown", [
    ("sae.k", 2, "sae.k 4 -> 2"),
    ("sae.n_latents", 32, "sae.n_latents 0 -> 32"),
    ("train.learning_rate", 1e-3, "train.learning_rate 0.003 -> 0.001"),
])
def test_changed_setting_is_refused_with_the_field_named(finished, store_path, name, field, value, shown):
  config = _config(finished, store_path, name=name)
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(RunMismatchError, match=shown.replace(".", r"\.") + r".*\n.*train\.name=.*overwrite=True"):
    train.train(config, progress=False)


def test_changed_block_is_refused(finished, store_path):
  config = _config(finished, store_path)
  config.block = "up_blocks.1.attentions.0"
  with pytest.raises(ValueError, match="block"):
    train.train(config, progress=False)


def test_more_steps_continue_and_say_so(finished, store_path, capsys):
  config = _config(finished, store_path, name="half")
  train.train(config, progress=False)  # finishes the half run at 6
  capsys.readouterr()
  out = train.train(_config(finished, store_path, name="half", steps=9), progress=False)
  said = capsys.readouterr().out
  assert "continuing with changed settings: train.steps 6 -> 9" in said
  assert out["step"] == 9
  # Same settings again: nothing to do, and it says so.
  train.train(_config(finished, store_path, name="half", steps=9), progress=False)
  assert "nothing to train" in capsys.readouterr().out


def test_metrics_hold_each_step_once_after_resumes(finished):
  for name, last in (("sae_unsup", 6), ("half", 9)):
    with open(os.path.join(finished, name, "metrics.jsonl")) as f:
      steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, last + 1)), (name, steps)


def test_overwrite_starts_afresh(store_path, tmp_path):
  train.train(_config(tmp_path, store_path, steps=3), progress=False)
  config = _config(tmp_path, store_path, steps=3)
  config.sae.k = 2
  config.overwrite = True
  out = train.train(config, progress=False)
  assert out["step"] == 3
  with open(os.path.join(tmp_path, "sae_unsup", runs.FILE)) as f:
    assert json.load(f)["settings"]["sae.k"] == 2
  with open(os.path.join(tmp_path, "sae_unsup", "export", "cfg.json")) as f:
    assert json.load(f)["k"] == 2


@pytest.mark.parametrize("field,value,match", [
    ("sae.k", 300, r"config\.sae\.k=300: more than the SAE's 64 latents"),
    ("train.batch_size", -4, r"config\.train\.batch_size=-4: must be a positive number"),
    ("sae.mode", "semi", r"config\.sae\.mode='semi': expected one of"),
    ("sae.matmul_dtype", "float8", r"config\.sae\.matmul_dtype='float8': expected one of '', 'bfloat16'"),
    ("sae.mode", "supervised", r"config\.sae\.assignment='greedy': no .*assignment\.json"),
])
def test_bad_train_values_fail_before_any_file(store_path, tmp_path, field, value, match):
  config = _config(tmp_path / "w", store_path)
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ConfigError, match=match):
    checks.check("train", config)
  assert not os.path.exists(tmp_path / "w")


def test_unknown_concept_fails_before_any_file(tmp_path):
  config = tiny.get_config()
  config.workdir = str(tmp_path / "w")
  config.evaluate.objects = ("cta",)
  with pytest.raises(ConfigError, match=r"config\.evaluate\.objects='cta': unknown object; did you mean cat\?"):
    checks.check("evaluate", config)
  assert not os.path.exists(tmp_path / "w")


def test_block_names_match_the_unet(tmp_path):
  """The checks' block list (read from unet/config.json, no JAX) equals the
  hookable blocks of the loaded UNet."""
  from saemnesia_jax.diffusion import hooks
  from saemnesia_jax.diffusion import models
  from saemnesia_jax.diffusion import tiny as tiny_lib
  path = tiny_lib.write_tiny_pipeline(str(tmp_path / "tiny"), seed=0)
  with open(os.path.join(path, "unet", "config.json")) as f:
    names = checks.unet_blocks(json.load(f))
  assert sorted(names) == sorted(hooks.hookable_blocks(models.load_pipeline(path).params["unet"]))


def test_a_changed_list_names_the_entries_that_came_and_went():
  long = ["fine: gammas.saemnesia=-0.1/-0.2/-0.35/-0.5/-1/-2/-4/-10"]
  change = lambda old, new: runs.describe(runs.differences({"settings": {"v": old}}, {"settings": {"v": new}}))
  # Both sides of a long list shorten to the same text; the added entry is named.
  assert change(long, long + ["late: start=0.5"]) == 'v +"late: start=0.5"'
  assert change([1, 2], [3, 2]) == "v -1 +3"
  assert change([1, 2], [2, 1]) == "v [1, 2] -> [2, 1]"  # same entries, other order
  assert change(6, 9) == "v 6 -> 9"


def test_a_field_added_later_hashes_as_absent_at_its_default():
  # A pipeline finished before sae.selection existed keeps its records: at its
  # default the field does not enter the step's fingerprint; set otherwise, it does.
  from saemnesia_jax import pipeline
  now = tiny.get_config()
  before = tiny.get_config()
  del before.sae["selection"]
  assert pipeline.fingerprints(pipeline.stage_configs(now)) == pipeline.fingerprints(pipeline.stage_configs(before))
  # A stage's run record made before the field: no difference at the default, one otherwise.
  old = {"settings": {"sae.k": 8}}
  assert runs.differences(old, {"settings": {"sae.k": 8, "sae.selection": "auto"}}) == {}
  assert runs.differences(old, {"settings": {"sae.k": 8, "sae.selection": "exact"}}) == {
      "sae.selection": ("auto", "exact")}
  now.sae.selection = "exact"
  assert pipeline.fingerprints(pipeline.stage_configs(now))["train"] != \
      pipeline.fingerprints(pipeline.stage_configs(before))["train"]
