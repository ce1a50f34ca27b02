"""Dry runs for a Cloud TPU slice from this CPU host (--config.topology): the
real TPU compiler (libtpu, ``pip install -e '.[tpu]'``) compiles the tiny
config's train step, capture sampler and clamp sampler for v5e-4.

Each program is compiled once for the module (module-scoped fixtures). No
skips: without libtpu every test fails, saying what to install.
"""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from saemnesia_jax import collect, evaluate, train
from saemnesia_jax.runtime import cli, hlo_stats, layout, topology
from saemnesia_jax.runtime.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

SLICE = "v5e-4"


@pytest.fixture(scope="module", autouse=True)
def libtpu():
  if not topology.libtpu_installed():
    pytest.fail("libtpu is not installed: these tests compile with the TPU compiler; "
                "pip install -e '.[tpu]' (jax[tpu] at the installed jax's version)", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
  # An executable compiled for compile-only devices cannot be read back from
  # the persistent cache (conftest's): "PjRtCompiler must be constructed with a Client".
  old = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", old)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = tiny.get_config()
  c.workdir = str(tmp_path_factory.mktemp("topology"))
  c.dry_run, c.topology = True, SLICE
  c.sampler.num_steps = 2
  c.sae.backward = "auto"
  return c


@pytest.fixture(scope="module")
def train_out(config):
  return train.dry_run(config, print_fn=lambda *_: None)


@pytest.fixture(scope="module")
def capture_out(config):
  return collect.run(config)


@pytest.fixture(scope="module")
def clamp_out(config):
  return evaluate.dry_run(config, print_fn=lambda *_: None)


def test_slice_names_map_to_the_chips():
  # v4 / v5p names count TensorCores (2 per chip), v5e / v6e names count chips.
  assert [len(topology.devices(n)) for n in ("v5e-4", "v5e-8", "v5p-8", "v6e-8", "v4-32", "v5p-64")] == \
      [4, 8, 4, 8, 16, 32]
  assert topology.devices("v5p-8")[0].device_kind == topology.CHIPS["v5p"].device_kind
  with pytest.raises(ConfigError, match="known: v4-8"):
    topology.resolve("v5p-7")


def test_jax_stays_on_the_cpu_with_libtpu_installed():
  assert jax.devices()[0].platform == "cpu"
  if not cli._tpu_attached():
    assert cli.cpu_only({})  # no TPU attached: the CPU settings apply without JAX_PLATFORMS


@pytest.mark.parametrize("which", ["train", "capture", "clamp"])
def test_memory_figures_come_from_the_tpu_compiler(which, train_out, capture_out, clamp_out, config):
  out = {"train": train_out, "capture": capture_out, "clamp": clamp_out}[which]
  chip = topology.CHIPS["v5e"]
  assert out["device_kind"] == chip.device_kind == "TPU v5 lite" and out["topology"] == SLICE
  a = out["program"]
  assert a["hbm_bytes"] == chip.hbm_bytes and a["fits"] is True
  assert 0 < a["per_device_bytes"]["total"] < chip.hbm_bytes
  assert a["flops_per_device"] > 0 and a["bytes_accessed_per_device"] > 0
  assert a["roofline_s"] == pytest.approx(max(a["flops_per_device"] / chip.peak_bf16_flops,
                                              a["bytes_accessed_per_device"] / chip.hbm_bytes_per_s))
  program = f"train_{config.train.name}" if which == "train" else {"capture": "collect", "clamp": "evaluate"}[which]
  with open(layout.dry_run_file(config.workdir, program)) as f:
    assert json.load(f)["program"]["per_device_bytes"] == a["per_device_bytes"]


def test_samplers_run_on_one_chip_without_collectives(capture_out, clamp_out):
  for out in (capture_out, clamp_out):
    assert out["devices"] == 1 and out["slice_devices"] == 4
    assert all(v["count"] == 0 for v in out["program"]["collectives"].values())
    # XLA counts the denoising loop's body once; the dry run adds it for the other trips.
    loop, a = out["program"]["loop"], out["program"]
    assert loop["trips"] == out["num_steps"] and loop["body_flops"] > 0
    assert a["flops_per_device"] == pytest.approx(loop["counted_once"]["flops"] + (loop["trips"] - 1) *
                                                  loop["body_flops"])
  # The clamp sampler does the SAE's work on top of the plain UNet's.
  assert clamp_out["xla_flops_per_call"] > 0 and capture_out["xla_flops_per_call"] > 0


def test_the_data_parallel_step_all_reduces_the_gradients(train_out):
  # mesh (-1, 1): 'data' = 4 chips, the parameters replicated: the gradients
  # are summed over 'data' by all-reduce; nothing is scattered or permuted.
  assert train_out["mesh"] == {"data": 4, "model": 1}
  col = train_out["program"]["collectives"]
  assert col["all-reduce"]["count"] >= 1
  assert col["all-reduce"]["bytes"] >= train_out["per_device_bytes"]["params"]
  assert col["reduce-scatter"]["count"] == col["all-to-all"]["count"] == 0


def test_auto_compares_both_backwards_and_takes_dense_on_tpu(train_out):
  assert train_out["backward"] == "dense"  # sae.backward=auto on a TPU
  assert set(train_out["backwards"]) == {"dense", "sparse"}
  assert train_out["cheaper_backward"] in ("dense", "sparse")


def test_an_oversized_batch_is_refused_with_exit_2(config):
  # 2**24 tokens over 4 chips: each chip's 2**22 tokens x 1,024 latents of
  # pre-activations alone are 16 GiB in float32, a v5e chip's whole HBM.
  # (Per-token TopK: BatchTopK's selection over the batch overflows top_k's int32 first.)
  cmd = [sys.executable, "-m", "saemnesia_jax.train", "--config", os.path.join(ROOT, "configs/tiny.py"),
         f"--config.workdir={config.workdir}", "--config.dry_run=True", f"--config.topology={SLICE}",
         "--config.sae.backward=dense", "--config.sae.batch_topk=False", "--config.sae.expansion_factor=16",
         f"--config.train.batch_size={2**24}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "does not fit" in proc.stderr and "train.batch_size" in proc.stderr


def test_hlo_stats_counts_loop_bodies_by_their_trip_count():
  text = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), replica_groups={}, to_apply=%add
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%x), dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = bf16[4,4]{1,0} reduce-scatter(%y), dimensions={0}, to_apply=%add
}
"""
  stats = hlo_stats.collectives(text)
  assert stats["all-reduce"] == {"count": 5, "bytes": 5 * 32}
  assert stats["all-gather"] == {"count": 5, "bytes": 5 * 128}  # the result of the start, once
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 32}


def test_the_pipeline_prices_the_whole_run_from_the_compiled_programs(train_out, capture_out, clamp_out, config):
  # The tiny config's counts by hand, at the rates the TPU compiler gave the programs above.
  from saemnesia_jax import pipeline
  from saemnesia_jax.evaluation import concepts, protocol
  from saemnesia_jax.runtime import pricing, sizing
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.pipeline.stages = tuple(s for s in cfg.pipeline.stages if s != "attack")
  configs = pipeline.stage_configs(cfg)
  compiled = {"collect": capture_out, "train": train_out, "train_sup": train_out, "evaluate": clamp_out}
  lines = {ln.step: ln for ln in pipeline.price_lines(configs, compiled, sampling_chips=2)}
  images = len(concepts.prompt_grid(cfg.concepts)) * len(cfg.collect.seeds)
  assert lines[f"collect {cfg.block}"].work == images
  assert lines[f"collect {cfg.block}"].rate == pytest.approx(2 * capture_out["program"]["throughput"])
  t = configs["train"].train
  maps_tokens = images * cfg.sampler.num_steps * sizing.shape_record(cfg).tokens_per_map
  assert lines[f"train {cfg.block}"].work == pytest.approx(t.steps * train_out["tokens_per_step"])
  assert lines[f"scores {cfg.block}"].work == pytest.approx(maps_tokens)
  per_seed = len(protocol.evaluation_grid(configs["evaluate"]))
  ev = [ln for name, ln in lines.items() if name.startswith("evaluate")]
  assert ev and all(ln.work % per_seed == 0 for ln in ev)
  final = lines["evaluate: final"].work / per_seed  # 'none' and one unit per (method, concept), per seed
  n_targets = len(cfg.evaluate.objects or cfg.concepts.objects) + len(cfg.evaluate.styles or cfg.concepts.styles)
  assert final == len(cfg.evaluate.eval_seeds) * (1 + 2 * n_targets)
  priced = pricing.price(list(lines.values()), slice_chips=4)
  assert priced["wall_s"] == pytest.approx(sum(ln.work / ln.rate for ln in lines.values()))
  assert priced["chip_hours"] == pytest.approx(priced["wall_s"] * 4 / 3600)
  # A step compiled before with the same settings is read back, not compiled again.
  step = next(s for s in pipeline.registry.PIPELINE if s.name == "evaluate")
  c = ml_collections.ConfigDict(configs["evaluate"].to_dict())
  with open(layout.dry_run_file(c.workdir, "pipeline_evaluate"), "w") as f:
    json.dump({"key": "k1", "dry_run": {"marker": 1}}, f)
  assert pipeline._compiled(step, c, "k1") == {"marker": 1}


def test_the_supervised_step_compiles_for_the_slice_with_its_whole_batch_cost(config):
  # Micro-batches run in a loop (whose body XLA's cost analysis may count once): FLOPs
  # and bytes come from the same step over the whole batch at once, at least the
  # encoder's and decoder's forward matmuls by hand (2 x d_in x L each per token).
  from saemnesia_jax.runtime import config_defaults
  sup = config_defaults.supervised_of(config)
  sup.train.micro_batches, sup.train.batch_size = 2, 4
  out = train.dry_run(sup, print_fn=lambda *_: None)
  a = out["program"]
  assert out["mode"] == "supervised" and out["device_kind"] == "TPU v5 lite" and a["fits"] is True
  assert a["cost_from"] == "the same step at train.micro_batches=1"
  by_hand = 2 * 2 * out["d_in"] * out["n_latents"] * out["tokens_per_step"] / out["devices"]
  assert a["flops_per_device"] >= by_hand and a["counted_once"]["flops"] > 0
