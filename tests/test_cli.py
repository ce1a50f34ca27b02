"""The command line of every stage: help, bad values, typos (subprocesses)."""
import os
import subprocess
import sys

import pytest

from saemnesia_jax import cli, config_defaults, config_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("SAEMNESIA_DEBUG", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=120)


def test_help_exits_0_and_documents_the_fields():
  r = _run("saemnesia_jax.train", "--help")
  assert r.returncode == 0, r.stderr
  assert "usage: python -m saemnesia_jax.train --config" in r.stdout
  assert "Stage `train`" in r.stdout  # what it reads and writes: the module docstring
  for line in ("sae.k", "active latents per token", "train.steps", "overwrite"):
    assert line in r.stdout
  r = _run("saemnesia_jax.evaluate", "--help", "--config", "configs/canvas_mini.py")
  assert r.returncode == 0, r.stderr
  assert "evaluate.gammas" in r.stdout and "(-0.1, -0.5, -2.0, -10.0)" in r.stdout


def test_every_shared_field_is_documented():
  docs = config_docs.field_docs()
  sections = {**config_defaults.SHARED, **config_defaults.SECTIONS}
  missing = [f"{s}.{k}" for s, fields in sections.items() for k in fields if f"{s}.{k}" not in docs]
  missing += [k for k in config_defaults.TOP if k not in docs]
  assert not missing


def test_a_typo_names_its_section_and_the_closest_fields(tmp_path):
  r = _run("saemnesia_jax.sample", "--config", "configs/tiny.py", "--config.sampler.widht=64",
           f"--config.workdir={tmp_path}/w")
  assert r.returncode == 2
  assert "config.sampler has no field 'widht'; did you mean width" in r.stderr
  assert "Traceback" not in r.stderr


# One bad value per entry point: exit 2, at most three lines, no traceback, no files.
BAD = {
    "sample": ("configs/tiny.py", "--config.seeds=()"),
    "collect": ("configs/tiny.py", "--config.sampler.num_steps=0"),
    "probe": ("configs/tiny.py", "--config.probe.val_fraction=1.5"),
    "train": ("configs/tiny.py", "--config.train.batch_size=-1"),
    "scores": ("configs/tiny.py", "--config.scores.split=test"),
    "evaluate": ("configs/tiny.py", "--config.evaluate.methods=('saeuron','unknown')"),
    "canvas_mini.build": ("configs/canvas_mini.py", "--config.base_train.steps=0"),
    "unlearn": ("configs/canvas_mini.py", "--config.unlearn.concepts=('Dsik',)"),
    "pipeline": ("configs/tiny.py", "--config.pipeline.stages=('collect','bogus')"),
    # The test's own --config.workdir (a folder that does not exist) is the bad value here.
    "report": ("configs/tiny.py", "--config.workdir=-"),
    "canvas_mini.ship_saes": ("configs/canvas_mini.py", "--config.workdir=-"),
}


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_bad_value_is_one_clear_error(stage, tmp_path):
  config, bad = BAD[stage]
  r = _run(f"saemnesia_jax.{stage}", "--config", config, bad, f"--config.workdir={tmp_path}/w")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr
  assert 1 <= len(lines) <= 3 and lines[0].startswith("error: config."), r.stderr
  assert bad.split("=")[0][2:] in lines[0]  # names the field
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w")
  debug = _run(f"saemnesia_jax.{stage}", "--config", config, bad, f"--config.workdir={tmp_path}/w", "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr
