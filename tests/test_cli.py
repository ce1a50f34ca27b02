"""The command line of every stage: help, bad values, typos (subprocesses)."""
import os
import subprocess
import sys

import pytest

from saemnesia_jax.runtime import cli
from saemnesia_jax.runtime import config_defaults
from saemnesia_jax.runtime import config_docs

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
  assert "evaluate.gammas" in r.stdout and "(-0.15, -1.0, -6.0, -40.0)" in r.stdout


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
    "attack": ("configs/tiny.py", "--config.attack.target_seeds=(188,)"),  # a seed the evaluation judges
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


def test_half_precision_on_cpu_gets_the_low_memory_xla_flags():
  import ml_collections
  bf16 = ml_collections.ConfigDict({"model": {"dtype": "bfloat16"}})
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert cli.set_xla_cpu_flags(bf16, env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *cli.XLA_CPU_LOW_MEMORY_FLAGS]
  assert not cli.set_xla_cpu_flags(bf16, env)  # already there: not added twice
  fp32 = ml_collections.ConfigDict({"model": {"dtype": "float32"}})
  assert not cli.set_xla_cpu_flags(fp32, {"JAX_PLATFORMS": "cpu"})
  assert not cli.set_xla_cpu_flags(bf16, {"JAX_PLATFORMS": "cuda"})  # accelerators keep XLA's defaults
  user = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
  cli.set_xla_cpu_flags(bf16, user)  # the user's own choice of a flag wins
  assert "scheduler=false" not in user["XLA_FLAGS"]


_BF16_SCAN = """
import jax, jax.numpy as jnp, ml_collections, sys
from saemnesia_jax.runtime import cli
if sys.argv[1] == "1":
  cli.set_xla_cpu_flags(ml_collections.ConfigDict({"model": {"dtype": "bfloat16"}}))
ws = [jnp.ones((256, 256), jnp.bfloat16) for _ in range(8)]
def loop(x, ws):
  def body(c, _):
    for w in ws:
      c = jnp.tanh(c @ w)
    return c, None
  return jax.lax.scan(body, x, jnp.arange(3))[0]
print(jax.jit(loop).lower(jnp.ones((4, 256), jnp.bfloat16), ws).compile().memory_analysis().temp_size_in_bytes)
"""


def test_low_memory_flags_keep_bf16_weights_from_being_copied_to_fp32_all_at_once():
  """A bf16 scan over 8 weights: XLA:CPU's defaults hold all 8 as fp32 copies; the flags hold ~one."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  temp = [int(subprocess.run([sys.executable, "-c", _BF16_SCAN, flag], env=env, capture_output=True, text=True,
                             check=True, timeout=120).stdout.split()[-1]) for flag in ("0", "1")]
  fp32_weights = 8 * 256 * 256 * 4
  assert temp[0] >= fp32_weights  # the default: every weight upcast at once
  assert temp[1] < fp32_weights / 4, temp
