"""Every stage at Stable Diffusion v1.5's shape, through the CLIs, on random weights.

  python benchmarks/sd_scale.py                  # 256 px stages + one 512 px image with CFG in bf16
  python benchmarks/sd_scale.py --size 512 --stages sample512

Builds once (cached under benchmarks/.cache/, gitignored) a random-weight
pipeline with SD v1.5's exact architecture: the UNet (block_out_channels
320/640/1280/1280, 2 layers per block, 8 heads, cross-attention 768: 859.5M
parameters), the CLIP ViT-L/14 text tower (12 layers, width 768, 77 tokens),
the VAE (128/256/512/512) and a CLIP BPE tokenizer written from a
vocab.json + merges.txt it generates (byte-level base alphabet plus merges
for the prompt words), all in diffusers' Flax format with float32 weights (as
the SD v1.5 Flax checkpoint); and two random timm ViT-L/16 classifiers (20
objects, 51 styles) in the UnlearnCanvas checkpoint layout, for the judge.

Then runs each stage as its own ``python -m saemnesia_jax.<stage>`` process
(configs/sd15.py with tiny counts: 2 objects x 2 styles, 1 seed, 2 DDIM steps;
the SAE at d_in 1280 and 20,480 latents) and prints per stage the wall time,
the XLA compile time and the process's peak host memory (VmHWM), and writes
them as JSON (``--json_out``, default benchmarks/results/sd_scale.json).
Run it after any change to the SD path. It is heavy (minutes of both cores):
not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
PIPE_DIR = os.path.join(CACHE, "sd15_random")
CLF_DIR = os.path.join(CACHE, "uc_classifiers_random")

# SD v1.5's architecture (its unet/, text_encoder/ and vae/ config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768, layer_norm_eps=1e-5)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512))
OBJECTS = ("Dogs", "Cats")
STYLES = ("Van_Gogh", "Cartoon")
WORDS = "a an image in style of the photo painting".split()


# ------------------------------------------------------------ the pipeline


def _random_leaf(rng, path: tuple, shape) -> "np.ndarray":
  import numpy as np
  name = path[-1]
  if name in ("scale", "gamma"):
    return np.ones(shape, np.float32)
  if name in ("bias", "beta"):
    return np.zeros(shape, np.float32)
  if name == "embedding" or len(shape) < 2:
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  fan_in = int(np.prod(shape[:-1]))  # Dense (in, out), Conv (kh, kw, in, out)
  return (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(np.float32)


def write_random_msgpack(path: str, shapes: dict, seed: int) -> int:
  """Random float32 weights of the tree ``shapes`` (ShapeDtypeStructs) as a
  Flax msgpack file, written leaf by leaf (never the whole tree in memory).
  Returns the parameter count."""
  import msgpack
  import numpy as np
  from flax import serialization
  rng = np.random.default_rng(seed)
  packer = msgpack.Packer(use_bin_type=True)
  count = 0

  def rec(f, node, path):
    nonlocal count
    if isinstance(node, dict):
      f.write(packer.pack_map_header(len(node)))
      for k, v in node.items():
        f.write(packer.pack(k))
        rec(f, v, path + (k,))
    else:
      arr = _random_leaf(rng, path, tuple(node.shape))
      count += arr.size
      f.write(packer.pack(msgpack.ExtType(int(serialization._MsgpackExtType.ndarray),
                                          serialization._ndarray_to_bytes(arr))))

  with open(path + ".tmp", "wb") as f:
    rec(f, shapes, ())
  os.replace(path + ".tmp", path)
  return count


def _bpe_files(folder: str, words) -> None:
  """A CLIP BPE tokenizer (vocab.json, merges.txt, configs): CLIP's byte-level
  base alphabet, each with and without the end-of-word mark, plus left-to-right
  merges that spell every word of ``words`` as one token."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  base = list(bytes_to_unicode().values())
  vocab = base + [b + "</w>" for b in base]
  merges = []
  for w in sorted({w.lower() for w in words}):
    symbols = [bytes_to_unicode()[b] for b in w.encode()]
    symbols[-1] += "</w>"
    cur = symbols[0]
    for s in symbols[1:]:
      if (cur, s) not in merges:
        merges.append((cur, s))
      cur += s
  for a, b in merges:
    if a + b not in vocab:
      vocab.append(a + b)
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|endoftext|>")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
               **special}, f)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special, f)


def build_pipeline(path: str = PIPE_DIR, seed: int = 0) -> str:
  """Writes (once) the random SD v1.5-architecture pipeline; returns its path."""
  if os.path.isfile(os.path.join(path, "model_index.json")):
    return path
  import jax
  from saemnesia_jax.diffusion import models
  from saemnesia_jax.diffusion import tiny as tiny_lib
  from saemnesia_jax.evaluation.unlearncanvas import OBJECT_CLASSES, STYLES as ALL_STYLES
  tmp = path + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  words = WORDS + [w for name in (*OBJECT_CLASSES, *ALL_STYLES) for w in name.replace("_", " ").split()]
  _bpe_files(os.path.join(tmp, "tokenizer"), words)
  tok = models.AutoTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
  key = jax.random.PRNGKey(0)
  counts = {}
  unet = models.FlaxUNet2DConditionModel(**SD15_UNET)
  unet.save_config(os.path.join(tmp, "unet"))
  counts["unet"] = write_random_msgpack(os.path.join(tmp, "unet", models.UNET_FLAX_WEIGHTS),
                                        jax.eval_shape(unet.init_weights, key), seed)
  vae = models.FlaxAutoencoderKL(**SD15_VAE)
  vae.save_config(os.path.join(tmp, "vae"))
  counts["vae"] = write_random_msgpack(os.path.join(tmp, "vae", models.VAE_FLAX_WEIGHTS),
                                       jax.eval_shape(vae.init_weights, key), seed + 1)
  eos = tok.convert_tokens_to_ids("<|endoftext|>")
  text_config = models.CLIPTextConfig(**SD15_TEXT, bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
                                      eos_token_id=eos, pad_token_id=eos)
  text_config.save_pretrained(os.path.join(tmp, "text_encoder"))
  te = models.FlaxCLIPTextModel(text_config, _do_init=False)
  counts["text_encoder"] = write_random_msgpack(
      os.path.join(tmp, "text_encoder", models.TEXT_FLAX_WEIGHTS),
      jax.eval_shape(lambda: te.init_weights(key, (1, 77))), seed + 2)
  models.FlaxDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                           num_train_timesteps=1000).save_pretrained(os.path.join(tmp, "scheduler"))
  with open(os.path.join(tmp, "model_index.json"), "w") as f:
    json.dump({"_class_name": "FlaxStableDiffusionPipeline", "random_weights": True, "params": counts}, f)
  os.replace(tmp, path)
  print(f"wrote {path}: {counts} parameters")
  return path


def build_classifiers(path: str = CLF_DIR, seed: int = 0, width: int = 1024, depth: int = 24) -> str:
  """Random timm ViT-L/16 classifiers in UnlearnCanvas' layout (safetensors);
  ``width`` / ``depth`` smaller for the toy run."""
  import numpy as np
  from safetensors.numpy import save_file
  from saemnesia_jax.evaluation.unlearncanvas import FILES, OBJECT_CLASSES, STYLE_CLASSES
  os.makedirs(path, exist_ok=True)
  mlp, patch, side = 4 * width, 16, 14
  rng = np.random.default_rng(seed)
  n = lambda *s: (rng.standard_normal(s, np.float32) * 0.02).astype(np.float32)
  for task, classes in (("object", OBJECT_CLASSES), ("style", STYLE_CLASSES)):
    file = os.path.join(path, FILES[task][1])
    if os.path.isfile(file):
      continue
    sd = {"cls_token": n(1, 1, width), "pos_embed": n(1, side * side + 1, width),
          "patch_embed.proj.weight": n(width, 3, patch, patch), "patch_embed.proj.bias": n(width),
          "norm.weight": np.ones(width, np.float32), "norm.bias": n(width),
          "head.weight": n(len(classes), width), "head.bias": n(len(classes))}
    for i in range(depth):
      b = f"blocks.{i}."
      sd.update({b + "norm1.weight": np.ones(width, np.float32), b + "norm1.bias": n(width),
                 b + "attn.qkv.weight": n(3 * width, width), b + "attn.qkv.bias": n(3 * width),
                 b + "attn.proj.weight": n(width, width), b + "attn.proj.bias": n(width),
                 b + "norm2.weight": np.ones(width, np.float32), b + "norm2.bias": n(width),
                 b + "mlp.fc1.weight": n(mlp, width), b + "mlp.fc1.bias": n(mlp),
                 b + "mlp.fc2.weight": n(width, mlp), b + "mlp.fc2.bias": n(width)})
    save_file(sd, file + ".tmp")
    os.replace(file + ".tmp", file)
  return path


# ------------------------------------------------------------------ stages


def anchor_prompts(folder: str = os.path.join(CACHE, "anchor_prompts")) -> str:
  """Two anchor prompts per object in UnlearnCanvas' sd_prompt_<object>.txt layout
  (configs/sd15.py collects on them, apart from the evaluation's prompts)."""
  os.makedirs(folder, exist_ok=True)
  for o in OBJECTS:
    with open(os.path.join(folder, f"sd_prompt_{o}.txt"), "w") as f:
      f.write(f"A photo of {o.lower()} in a garden.\nA painting of {o.lower()} at night.\n")
  return folder


def stage_commands(workdir: str, size: int, steps: int, pipe_dir: str = PIPE_DIR,
                   clf_dir: str = CLF_DIR) -> list[tuple[str, str, list[str]]]:
  """(name, module, args) of every stage, in order."""
  cfg = os.path.join(ROOT, "configs", "sd15.py")
  sup = os.path.join(ROOT, "configs", "sd15_sup.py")
  common = [f"--config.model.path={pipe_dir}", f"--config.workdir={workdir}",
            f"--config.sampler.height={size}", f"--config.sampler.width={size}",
            f"--config.sampler.num_steps={steps}", "--config.sampler.batch_size=2",
            f"--config.concepts.objects={OBJECTS!r}", f"--config.concepts.styles={STYLES!r}",
            "--config.collect.seeds=(1,)", "--config.seeds=(188,)",
            f"--config.collect.anchor_prompts_dir={anchor_prompts()}", "--config.collect.prompts_per_object=1"]
  # 8 anchor prompts (2 objects x 1 line x (2 styles + Seed Images + plain)) x 2 steps per block.
  # train.epochs=0: the tiny budgets below in steps (sd15 states its budgets in epochs of the store).
  train = ["--config.train.steps=4", "--config.train.epochs=0", "--config.train.style_block_epochs=0",
           "--config.train.batch_size=128", "--config.train.eval_every=2",
           "--config.train.log_every=2", "--config.train.ckpt_every=4", "--config.train.val_batches=1",
           "--config.train.init_tokens=128"]
  # 2 maps in 2 slices (the validation split holds 2 maps): the micro-batched step
  # (configs/sd15_sup.py: 128 maps in 8 slices).
  sup_train = ["--config.train.steps=4", "--config.train.epochs=0", "--config.train.style_block_epochs=0",
               "--config.train.batch_size=2", "--config.train.micro_batches=2",
               "--config.train.eval_every=2",
               "--config.train.log_every=2", "--config.train.ckpt_every=4", "--config.train.val_batches=1"]
  # One object and one style to erase (an SD UNet call is ~10 s per image here at 256 px): every
  # evaluate phase (sweep, final, sequential) runs once per method.
  ev = [f"--config.evaluate.classifier_dir={clf_dir}", "--config.evaluate.gammas=(-10.0,)",
        "--config.evaluate.percentiles=(99.99,)", "--config.evaluate.eval_seeds=(188,)",
        f"--config.evaluate.objects={OBJECTS[:1]!r}", f"--config.evaluate.styles={STYLES[:1]!r}",
        "--config.evaluate.sweep_seeds=(1,)", f"--config.evaluate.sequential_objects={OBJECTS[:1]!r}",
        "--config.evaluate.max_latents=8", f"--config.evaluate.num_steps={steps}"]
  return [
      ("sample", "saemnesia_jax.sample", [f"--config={cfg}", *common, f"--config.prompts=('A Dogs image in Van_Gogh style.',)"]),
      ("collect", "saemnesia_jax.collect", [f"--config={cfg}", *common]),
      ("train_unsup", "saemnesia_jax.train", [f"--config={cfg}", *common, *train]),
      ("scores_unsup", "saemnesia_jax.scores", [f"--config={cfg}", *common]),
      ("probe", "saemnesia_jax.probe", [f"--config={cfg}", *common, "--config.probe.steps=20"]),
      ("train_sup", "saemnesia_jax.train", [f"--config={sup}", *common, *sup_train]),
      ("scores_sup", "saemnesia_jax.scores", [f"--config={sup}", *common]),
      ("evaluate", "saemnesia_jax.evaluate", [f"--config={sup}", *common, *ev]),
  ]


def sample512_command(workdir: str, steps: int, dtype: str, pipe_dir: str = PIPE_DIR,
                      size: int = 512) -> tuple[str, str, list[str]]:
  """One 512 px image with CFG (batch 1: 2 UNet rows), the issue's memory figure."""
  cfg = os.path.join(ROOT, "configs", "sd15.py")
  return (f"sample512_{dtype}", "saemnesia_jax.sample", [
      f"--config={cfg}", f"--config.model.path={pipe_dir}", f"--config.workdir={workdir}",
      f"--config.sampler.height={size}", f"--config.sampler.width={size}", f"--config.sampler.num_steps={steps}",
      "--config.sampler.batch_size=1", f"--config.model.dtype={dtype}",
      "--config.prompts=('A Dogs image in Van_Gogh style.',)", "--config.seeds=(188,)"])


def child_main(stats_file: str, module: str, argv: list[str]) -> None:
  """Runs ``module`` as __main__, recording compile time and peak memory at exit."""
  import atexit
  import runpy
  import jax.monitoring
  compile_s = {"total": 0.0}

  def listener(event, duration, **_):
    if event.endswith("backend_compile_duration"):
      compile_s["total"] += duration
  jax.monitoring.register_event_duration_secs_listener(listener)

  def write():
    status = open("/proc/self/status").read()
    hwm_kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
    with open(stats_file, "w") as f:
      json.dump({"compile_s": compile_s["total"], "peak_rss_gib": hwm_kib / 2**20}, f)
  atexit.register(write)
  sys.argv = [module, *argv]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def run_stage(name: str, module: str, args: list[str], log_dir: str, nice: int = 10) -> dict:
  stats = os.path.join(log_dir, f"{name}.stats.json")
  log = os.path.join(log_dir, f"{name}.log")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", stats, module, *args]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  t0 = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.call(["nice", "-n", str(nice), *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  wall = time.perf_counter() - t0
  out = {"stage": name, "ok": rc == 0, "wall_s": round(wall, 1), "loadavg": open("/proc/loadavg").read().split()[:3]}
  if os.path.isfile(stats):
    s = json.load(open(stats))
    out.update(compile_s=round(s["compile_s"], 1), peak_rss_gib=round(s["peak_rss_gib"], 2))
  if rc != 0:
    out["log_tail"] = open(log).read()[-2000:]
  return out


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    return child_main(sys.argv[2], sys.argv[3], sys.argv[4:])
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", type=int, default=256, help="pixels of the stage runs")
  ap.add_argument("--steps", type=int, default=2, help="DDIM steps per image")
  ap.add_argument("--stages", default="all", help="comma-separated stage names, 'all', or 'sample512'")
  ap.add_argument("--memory_dtypes", default="bfloat16", help="dtypes of the 512 px one-image runs")
  ap.add_argument("--workdir", default=os.path.join(CACHE, "runs"))
  ap.add_argument("--nice", type=int, default=10, help="niceness of the stage processes (a shared host)")
  ap.add_argument("--resume", action="store_true",
                  help="keep the workdir and the JSON's rows (rerun some --stages of an earlier run)")
  ap.add_argument("--toy", action="store_true",
                  help="a tiny random SD-like pipeline and tiny classifiers instead (checks the script, in minutes)")
  ap.add_argument("--json_out", default=os.path.join(ROOT, "benchmarks", "results", "sd_scale.json"))
  a = ap.parse_args()
  t0 = time.perf_counter()
  if a.toy:
    from saemnesia_jax.diffusion import models
    pipe_dir, clf_dir = os.path.join(CACHE, "toy_pipeline"), os.path.join(CACHE, "toy_classifiers")
    if not os.path.isdir(pipe_dir):
      tiny_lib.write_tiny_pipeline(pipe_dir, seed=0)
    build_classifiers(clf_dir, width=64, depth=2)
    a.size = min(a.size, 32)
  else:
    pipe_dir, clf_dir = build_pipeline(), build_classifiers()
  build_s = time.perf_counter() - t0
  import shutil
  rows = []
  if a.resume and os.path.isfile(a.json_out):
    rows = json.load(open(a.json_out))["stages"]
  else:
    shutil.rmtree(a.workdir, ignore_errors=True)
  os.makedirs(a.workdir, exist_ok=True)
  json_rows = lambda: {"size": a.size, "steps": a.steps, "build_s": round(build_s, 1), "stages": rows,
                       "cpu_count": os.cpu_count(),
                       "note": "random weights, SD v1.5 architecture; CPU timings are shared-host"}
  # The one-image memory figure first: it does not depend on the other stages.
  cmds = [sample512_command(os.path.join(a.workdir, "s512"), a.steps, d, pipe_dir, 32 if a.toy else 512)
          for d in a.memory_dtypes.split(",") if d]
  cmds += stage_commands(a.workdir, a.size, a.steps, pipe_dir, clf_dir)
  if a.stages != "all":
    want = a.stages.split(",")
    cmds = [c for c in cmds if c[0] in want or c[0].split("_")[0] in want]
  for name, module, args in cmds:
    r = run_stage(name, module, args, a.workdir, a.nice)
    rows = [x for x in rows if x["stage"] != name] + [r]
    print(f"{name:16s} {'ok' if r['ok'] else 'FAILED':6s} wall {r['wall_s']:7.1f} s  compile "
          f"{r.get('compile_s', float('nan')):6.1f} s  peak host {r.get('peak_rss_gib', float('nan')):5.2f} GiB"
          f"  load {' '.join(r['loadavg'])}", flush=True)
    if not r["ok"]:
      print(r["log_tail"])
    os.makedirs(os.path.dirname(a.json_out), exist_ok=True)
    with open(a.json_out, "w") as f:  # after every stage: a partial run keeps its figures
      json.dump(json_rows(), f, indent=1)
    if not r["ok"] and name in ("collect", "train_unsup", "train_sup"):
      break  # the later stages read this one's output
  print(f"wrote {a.json_out}")


if __name__ == "__main__":
  main()
