"""The project's jitted sampler against PyTorch diffusers' UNet + DDIM loop, side by side.

  python benchmarks/vs_diffusers.py                                 # tiny SD-like + CanvasMini
  python benchmarks/vs_diffusers.py --models tiny --steps 3 --batch 2 --rounds 1   # a quick check

Both sides sample the same batch from the same weights: DDIM (eta 0), the
same number of steps, classifier-free guidance at the same scale, the same
starting noise and the same text conditioning.  Two variants:

  plain   the sampler as the pipeline stages run it (sample, collect).
  clamp   the latent clamp of unlearning (``saemnesia_jax/diffusion/clamp.py``) at the
          hooked block, with a random SAE (expansion 16, k 8; encoder,
          biases and decoder drawn independently, so a peer that confused
          W_enc with W_dec.T or dropped a bias would disagree) and a ClampSpec
          of 8 entries, 3 of them active: the 3 latents the SAE selects most
          often at that block on the first step of this very batch (so the
          clamp edits many tokens), the multiplier, threshold and on/off
          pattern varying with the step (so a peer that indexed steps
          differently would disagree); 5 inactive padding entries.

The project's side is ``saemnesia_jax.diffusion.sampler.Sampler`` (the one ``jax.jit``
around a ``lax.scan`` of UNet + CFG + DDIM step, the edit entered by
``nn.intercept_methods``, then the decode), built as
``benchmarks/sampler.py`` builds it, with its two inputs given as arrays:
``initial_latents`` returns the given noise (passed where the seeds go) and
``encode_text`` the given text conditioning (passed in the params), so the
two sides compare the UNet + scheduler loop (+ the VAE decode, where the
model has a VAE) and nothing else.  Its compile time (``lower`` +
``compile``) is reported apart from its run time.

The peer is diffusers' ``UNet2DConditionModel`` + ``DDIMScheduler`` (+
``AutoencoderKL`` for the decode) in PyTorch, loaded from the project's own
PyTorch export of the same pipeline (``torch_export.convert_to_pytorch``, what
``save_pipeline(fmt='safetensors')`` runs), driven by the usual diffusers
loop (scale_model_input, UNet on [uncond, cond], CFG, scheduler.step).
UNets with ``addition_embed_type='text_time'`` (CanvasMini) get the pooled
text embedding as ``added_cond_kwargs`` ({'text_embeds', 'time_ids' = 0}),
as ``models.unet_forward`` gives it to the Flax UNet.  The peer's clamp is a
``register_forward_hook`` on the same block (e.g. ``mid_block.attentions.0``)
doing ``clamp.clamp``'s algebra on the block's NCHW output read as
channels-last tokens, for both CFG halves, at the loop index of the step.

The starting noise (numpy, seed 0), the text embeddings (the project's text
encoder, once, on [uncond, cond] prompts from the model's config), the SAE
and the ClampSpec are made once in the project's process and written to one
.npz that the peer's process reads.

Agreement: after setup each side samples once and the driver compares the
final latents (before the VAE decode; pixels for pixel-space CanvasMini) and
the decoded images: max and mean absolute difference per variant.  It exits
nonzero (and writes no JSON) when the latents' max difference exceeds
``--tol * max(1, max |latent|)`` (default tol 1e-4, relative: the random
tiny model at CFG 9 drifts to latents of magnitude ~75 in 25 steps, while
CanvasMini's pixels stay in [-1, 1]).  Why 1e-4: both sides compute in
float32 but accumulate in different orders (oneDNN / XLA), so one UNet call
differs by ~7e-6 (eps of magnitude ~2.5) and after 3-25 DDIM steps the final
latents by 2e-6 - 4e-6 of their scale (measured; CFG multiplies the eps
difference by the guidance scale, DDIM's x0 estimate by up to 1/sqrt(alpha_bar)):
25x margin.  A real difference is far above it: the peer with diffusers'
PyTorch GEGLU as shipped (the exact erf GELU, where diffusers' Flax GEGLU
uses flax's default tanh-approximate ``nn.gelu``; up to 4.7e-4 apart per
activation) gives 2e-4 - 6e-4 of the scale, and a wrong clamp or conversion
10^-2 - 1.  The peer therefore runs GEGLU with the tanh GELU (``--peer-gelu
tanh``, the function the project's UNet computes; checked and timed); the
stock exact-GELU peer is sampled once too and its difference printed (not
checked).  The clamp's own effect (clamp vs plain on the project's side) is
printed beside it, so one sees the check would catch a clamp that did
nothing.

Timing: each side runs in its own long-lived process (driven over pipes,
JSON lines, as benchmarks/vs_sparsify.py does); rounds are interleaved
(project, peer 2 threads, peer 1 thread, then reversed, ...), and the
machine's load average is recorded beside every figure.  Reported: images/s
per side (median over rounds) and the ratio project / peer per thread count.
Writes the figures as JSON (``--json_out``, default
benchmarks/results/vs_diffusers.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from side_by_side import THREADS_NOTE, Worker, become_worker, loadavg, serve, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
ROOT = os.path.dirname(HERE)
CONFIGS = {"tiny": os.path.join(ROOT, "configs", "tiny.py"),
           "canvas_mini": os.path.join(ROOT, "configs", "canvas_mini.py")}
SAE_K, SAE_EXPANSION, CLAMP_ENTRIES, CLAMP_ACTIVE = 8, 16, 8, 3
DEFAULT_TOL = 1e-4



def model_defaults(name: str) -> dict:
  """block, guidance scale and prompts of a model's config (configs/<name>.py)."""
  if name not in CONFIGS:
    from saemnesia_jax.runtime import config_defaults
    return {"block": "up_blocks.1.attentions.1", "cfg": float(config_defaults.SAMPLER["guidance_scale"]),
            "prompts": ["A cat image in neon style."]}
  spec = importlib.util.spec_from_file_location(f"_vs_diffusers_config_{name}", CONFIGS[name])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  return {"block": c.block, "cfg": float(c.sampler.guidance_scale), "prompts": list(c.prompts)}


# ---------------------------------------------------------------- workers



def _clamp_spec(acts, sae, steps: int):
  """The benchmark's ClampSpec (numpy): the CLAMP_ACTIVE latents the SAE selects
  most often in ``acts`` (N, d_in), step-varying multipliers / thresholds / on-off.

  Not benchmarks/sampler.py's ``variants``: that builds its spec with fields
  (``scale``, ``gamma``) ClampSpec no longer has, and its fixed latents 0..2 of
  a random SAE are rarely among a token's top k, so its clamp would edit
  almost nothing and an agreement check on it would prove little.
  """
  import numpy as np
  from saemnesia_jax.diffusion import clamp
  pre = np.maximum((acts - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"], 0)
  top = np.argsort(-pre, axis=1)[:, :SAE_K]
  counts = np.bincount(top.ravel(), minlength=pre.shape[1])
  chosen = np.argsort(-counts, kind="stable")[:CLAMP_ACTIVE].astype(np.int32)
  # The median of each chosen latent's values where selected: a threshold that
  # lets about half of its firing tokens through.
  med = np.array([np.median(pre[np.any(top == i, axis=1), i]) for i in chosen], np.float32)
  cs = clamp.empty_spec(steps, CLAMP_ENTRIES)
  s = np.arange(steps)
  latents = cs.latents.copy()
  latents[:CLAMP_ACTIVE] = chosen
  latents[CLAMP_ACTIVE:] = 0  # padding entries: latent 0, never active
  active = cs.active.copy()
  active[:, :CLAMP_ACTIVE] = (s % 4 != 3)[:, None]  # off at every 4th step
  mult = cs.multiplier.copy()
  mult[:, :CLAMP_ACTIVE] = (-0.5 - 1.5 * (s % 3))[:, None] * np.array([1.0, 0.8, 1.2], np.float32)[None]
  mult[:, CLAMP_ACTIVE:] = -5.0  # would edit latent 0 if the peer ignored ``active``
  thr = cs.threshold.copy()
  thr[:, :CLAMP_ACTIVE] = np.where((s % 2 == 1)[:, None], med[None], 0.0)  # 0 / median, alternating
  return clamp.ClampSpec(latents, active, mult.astype(np.float32), thr.astype(np.float32)), counts[chosen]


def jax_worker() -> None:
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np
  from saemnesia_jax.diffusion import clamp
  from saemnesia_jax.diffusion import hooks
  from saemnesia_jax.diffusion import models
  from saemnesia_jax.diffusion import tiny as tiny_lib
  from saemnesia_jax.diffusion import torch_export
  from saemnesia_jax.sae import model as sae_lib
  from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec

  @dataclasses.dataclass(frozen=True)
  class GivenTextPipeline(models.Pipeline):
    """The pipeline, whose ``encode_text`` returns ``params['given_text']`` when present."""

    def encode_text(self, params, ids):
      given = params.get("given_text") if hasattr(params, "get") else None
      if given is None:
        return super().encode_text(params, ids)
      return models.TextCond(given["hidden"], given["pooled"])

  class GivenNoiseSampler(Sampler):
    """The project's sampler; the argument in the seeds' place is the starting noise itself."""

    def initial_latents(self, seeds):
      return jnp.asarray(seeds, jnp.float32)

  st = {}

  def handle(cmd):
    if cmd["cmd"] == "setup":
      t0 = time.perf_counter()
      path = cmd["path"]
      if path == "tiny":  # written here, not in the driver (which imports no JAX)
        path = tiny_lib.write_tiny_pipeline(os.path.join(cmd["tmp"], "tiny_pipeline"))
      pipe = models.load_pipeline(path)
      pipe = GivenTextPipeline(**{f.name: getattr(pipe, f.name) for f in dataclasses.fields(pipe)})
      steps, batch, block = cmd["steps"], cmd["batch"], cmd["block"]
      prompts = [cmd["prompts"][i % len(cmd["prompts"])] for i in range(batch)]
      ids = np.concatenate([pipe.tokenize([""] * batch), pipe.tokenize(prompts)])  # uncond first
      text = jax.jit(pipe.encode_text)(pipe.params, ids)  # the project's text encoder, once
      hidden, pooled = np.asarray(text.hidden, np.float32), np.asarray(text.pooled, np.float32)
      spec = dict(num_steps=steps, batch_size=batch)
      plain = GivenNoiseSampler(pipe, SamplerSpec(**spec))
      noise = np.random.default_rng(0).standard_normal((batch, *plain.latent_shape)).astype(np.float32)
      d_in = plain.block_output_shape(block)[-1]
      # A random SAE: the init's unit-norm decoder, then an encoder, biases of its own.
      sae = {k: np.asarray(v, np.float32)
             for k, v in sae_lib.init_params(jax.random.PRNGKey(0), d_in, d_in * SAE_EXPANSION).items()}
      rng = np.random.default_rng(1)
      sae["W_enc"] = (sae["W_enc"] + 0.3 * rng.standard_normal(sae["W_enc"].shape) / np.sqrt(d_in)).astype(np.float32)
      sae["b_enc"] = (0.05 * rng.standard_normal(sae["b_enc"].shape)).astype(np.float32)
      sae["b_dec"] = (0.1 * rng.standard_normal(sae["b_dec"].shape)).astype(np.float32)
      params = {**pipe.params, "given_text": {"hidden": jnp.asarray(hidden), "pooled": jnp.asarray(pooled)}}
      # The block's output at the first step of this batch (both CFG halves) picks the clamped latents.
      block_path = hooks.resolve_block(pipe.params["unet"], block)
      t_first = int(plain.timesteps[0])

      def first_block_output(params, x):
        _, v = pipe.unet_apply(params, x, t_first, pipe.encode_text(params, None),
                               capture_intermediates=hooks.capture_filter(block_path), mutable=["intermediates"])
        return hooks.captured_value(v["intermediates"], block_path)
      x0 = np.concatenate([noise, noise]) * float(plain.scheduler_state.init_noise_sigma)
      acts = np.asarray(jax.jit(first_block_output)(params, x0), np.float32).reshape(-1, d_in)
      cs, hits = _clamp_spec(acts, sae, steps)
      inputs = os.path.join(cmd["tmp"], "inputs.npz")
      np.savez(inputs, noise=noise, hidden=hidden, pooled=pooled, timesteps=plain.timesteps,
               **{f"sae_{k}": v for k, v in sae.items()},
               **{f"clamp_{k}": np.asarray(v) for k, v in cs._asdict().items()})
      sae_j = {k: jnp.asarray(v) for k, v in sae.items()}
      cs_j = clamp.ClampSpec(*(jnp.asarray(v) for v in cs))
      samplers = {"plain": (plain, None),
                  "clamp": (GivenNoiseSampler(pipe, SamplerSpec(**spec, edit_block=block), clamp.make_edit_fn(SAE_K)),
                            (sae_j, cs_j))}
      g = np.float32(cmd["cfg"])
      compiled, compile_s = {}, {}
      for v, (sampler, ep) in samplers.items():
        t = time.perf_counter()
        compiled[v] = (sampler.fn.lower(params, ids[batch:], ids[:batch], noise, g, ep).compile(), ep)
        compile_s[v] = time.perf_counter() - t
      st.update(compiled=compiled, params=params, ids=jnp.asarray(ids), noise=jnp.asarray(noise), g=g, batch=batch)
      return {"path": path, "inputs": inputs, "compile_s": compile_s, "setup_s": time.perf_counter() - t0, "d_in": d_in,
              "image_size": int(pipe.default_image_size), "latent_shape": list(plain.latent_shape),
              "has_vae": pipe.vae is not None, "timesteps": [int(t) for t in plain.timesteps],
              "clamp_latents": [int(i) for i in cs.latents[:CLAMP_ACTIVE]],
              "clamp_latent_hits_step0": [int(h) for h in hits], "tokens_step0": int(acts.shape[0]),
              "device": str(jax.devices()[0]), "jax": jax.__version__}

    def call(v):
      fn, ep = st["compiled"][v]
      b = st["batch"]
      return fn(st["params"], st["ids"][b:], st["ids"][:b], st["noise"], st["g"], ep)

    if cmd["cmd"] == "sample":  # one run, outputs to a file (the agreement check)
      t = time.perf_counter()
      out = jax.block_until_ready(call(cmd["variant"]))
      np.savez(cmd["out"], latents=np.asarray(out.latents), images=np.asarray(out.images))
      return {"first_run_s": time.perf_counter() - t}
    if cmd["cmd"] == "run":
      t = time.perf_counter()
      jax.block_until_ready(call(cmd["variant"]))
      return {"run_s": time.perf_counter() - t}
    raise ValueError(f"unknown command {cmd['cmd']!r}")

  serve(handle)


def torch_worker() -> None:
  import numpy as np
  import torch
  from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
  from saemnesia_jax.diffusion import models
  from diffusers.models.activations import GEGLU
  st = {}
  _tanh_gelu = lambda gate: torch.nn.functional.gelu(gate, approximate="tanh")

  def clamp_hook(module, inputs, output):
    """``clamp.clamp`` on the block's output: NCHW read as channels-last tokens (the
    project's layout), both CFG halves, at loop index ``st['step']``."""
    del module, inputs
    x = output[0] if isinstance(output, tuple) else output.sample
    b, c, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(-1, c)
    sae, cs, s = st["sae"], st["clamp"], st["step"]
    values, indices = torch.relu((tokens - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"]).topk(SAE_K, dim=-1)
    hit = indices[:, :, None] == cs["latents"][None, None, :]  # (N, k, M)
    z_sel = (values[:, :, None] * hit).sum(1)  # (N, M): 0 where a latent is not in a token's top k
    on = cs["active"][s][None] & (z_sel > cs["threshold"][s][None])
    delta = torch.where(on, (cs["multiplier"][s][None] - 1.0) * z_sel, torch.zeros_like(z_sel))
    y = (tokens + delta @ sae["W_dec"][cs["latents"]]).reshape(b, h, w, c).permute(0, 3, 1, 2)
    if isinstance(output, tuple):
      return (y, *output[1:])
    output.sample = y
    return output

  def sample():
    unet, sched, vae = st["unet"], st["sched"], st["vae"]
    hidden, pooled, g = st["hidden"], st["pooled"], st["cfg"]
    sched.set_timesteps(st["steps"])
    latents = st["noise"] * sched.init_noise_sigma
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
      c = unet.config  # as models.unet_forward: time_ids of zeros fill the rest of the projection's input
      n_ids = (c.projection_class_embeddings_input_dim - pooled.shape[-1]) // c.addition_time_embed_dim
      kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.zeros((pooled.shape[0], n_ids))}
    for i, t in enumerate(sched.timesteps):
      st["step"] = i
      x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
      eps = unet(x_in, t, encoder_hidden_states=hidden, **kwargs).sample
      eps_uncond, eps_cond = eps.chunk(2)
      eps = eps_uncond + g * (eps_cond - eps_uncond)
      latents = sched.step(eps, t, latents, eta=0.0).prev_sample
    x = latents
    if vae is not None:
      x = vae.decode(x / vae.config.scaling_factor).sample
    images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return latents, images

  def set_gelu(mode):
    """GEGLU's gate activation: 'tanh' (flax's default nn.gelu, what diffusers' Flax GEGLU
    computes) or 'exact' (erf: diffusers' PyTorch GEGLU as shipped)."""
    for m in st["geglu"]:
      if mode == "tanh":
        m.gelu = _tanh_gelu
      elif "gelu" in vars(m):
        del m.gelu
    st["gelu"] = mode

  def run(variant):
    handle = st["block"].register_forward_hook(clamp_hook) if variant == "clamp" else None
    try:
      with torch.inference_mode():
        return sample()
    finally:
      if handle is not None:
        handle.remove()

  def handle(cmd):
    if cmd["cmd"] == "setup":
      t0 = time.perf_counter()
      export = os.path.join(cmd["tmp"], "pt")
      os.makedirs(export)
      for sub in ("unet", "vae", "scheduler"):
        if os.path.isdir(os.path.join(cmd["path"], sub)):
          shutil.copytree(os.path.join(cmd["path"], sub), os.path.join(export, sub))
      torch_export.convert_to_pytorch(export, safetensors=True)  # the project's own export
      unet = UNet2DConditionModel.from_pretrained(os.path.join(export, "unet")).eval()
      vae = (AutoencoderKL.from_pretrained(os.path.join(export, "vae")).eval()
             if os.path.isdir(os.path.join(export, "vae")) else None)
      sched = DDIMScheduler.from_config(DDIMScheduler.load_config(os.path.join(export, "scheduler")))
      z = np.load(cmd["inputs"])
      f = lambda k: torch.from_numpy(np.ascontiguousarray(z[k]))
      st.update(unet=unet, vae=vae, sched=sched, block=unet.get_submodule(cmd["block"]), steps=cmd["steps"],
                cfg=float(cmd["cfg"]), noise=f("noise"), hidden=f("hidden"), pooled=f("pooled"),
                sae={k: f(f"sae_{k}") for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
                clamp={k: f(f"clamp_{k}") for k in ("active", "multiplier", "threshold")})
      st["clamp"]["latents"] = f("clamp_latents").long()
      st["geglu"] = [m for m in unet.modules() if isinstance(m, GEGLU)]
      set_gelu(cmd["gelu"])
      sched.set_timesteps(cmd["steps"])
      if not np.array_equal(sched.timesteps.numpy(), z["timesteps"]):
        raise ValueError(f"DDIM timesteps differ: diffusers {sched.timesteps.tolist()}, "
                         f"the project's {z['timesteps'].tolist()}")
      return {"setup_s": time.perf_counter() - t0, "torch": torch.__version__,
              "block_class": type(st["block"]).__name__}
    if cmd["cmd"] == "sample":
      torch.set_num_threads(cmd["threads"])
      default = st["gelu"]
      set_gelu(cmd.get("gelu", default))
      t = time.perf_counter()
      try:
        latents, images = run(cmd["variant"])
      finally:
        set_gelu(default)
      np.savez(cmd["out"], latents=latents.numpy(), images=images.numpy())
      return {"first_run_s": time.perf_counter() - t}
    if cmd["cmd"] == "run":
      torch.set_num_threads(cmd["threads"])
      t = time.perf_counter()
      run(cmd["variant"])
      return {"run_s": time.perf_counter() - t, "threads": torch.get_num_threads()}
    raise ValueError(f"unknown command {cmd['cmd']!r}")

  serve(handle)


# ---------------------------------------------------------------- driver



def _diff(a, b) -> dict:
  import numpy as np
  d = np.abs(a.astype(np.float64) - b.astype(np.float64))
  return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "scale": float(np.abs(b).max())}


def main() -> None:
  import numpy as np
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="tiny,canvas_mini", help="comma list: tiny, canvas_mini, or pipeline dirs")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--cfg", type=float, default=None,
                  help="guidance scale; default: the model's config (configs/tiny.py 9.0, configs/canvas_mini.py 1.5)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--block", default=None,
                  help="hooked block; default: the model's config (tiny up_blocks.1.attentions.1, "
                       "canvas_mini mid_block.attentions.0)")
  ap.add_argument("--variants", default="plain,clamp")
  ap.add_argument("--peer-threads", default="2,1", help="comma list: torch thread counts of the peer")
  ap.add_argument("--peer-gelu", default="tanh", choices=("tanh", "exact"),
                  help="the peer's GEGLU activation: tanh (the function the project's Flax UNet computes; "
                       "checked and timed) or exact (diffusers' PyTorch GEGLU as shipped); the other is "
                       "compared once too")
  ap.add_argument("--tol", type=float, default=DEFAULT_TOL,
                  help="max |project - peer| allowed on the final latents, relative to max(1, max |latent|) "
                       "(see the module docstring)")
  ap.add_argument("--json_out", default=os.path.join(HERE, "results", "vs_diffusers.json"))
  args = ap.parse_args()
  threads = [int(t) for t in args.peer_threads.split(",")]
  variants = args.variants.split(",")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)  # one CPU device, all cores
  cpus = os.cpu_count()
  print(f"machine: {cpus} CPUs; the project's XLA uses them all; the peer runs with {threads} torch threads")
  print(f"note: {THREADS_NOTE}")
  results, failures = [], []
  tmp_root = tempfile.mkdtemp(prefix="vs_diffusers_")
  try:
    for name in args.models.split(","):
      if name == "tiny":
        path = "tiny"  # tiny_lib.write_tiny_pipeline into the run's temp dir, by the project's process
      elif name == "canvas_mini":
        from saemnesia_jax.canvas_mini import PIPELINE_DIR
        if not os.path.isdir(os.path.join(PIPELINE_DIR, "unet")):
          print(f"skipping canvas_mini: {PIPELINE_DIR} not built")
          continue
        path = PIPELINE_DIR
      else:
        path = name
      d = model_defaults(name)
      block = args.block or d["block"]
      cfg = d["cfg"] if args.cfg is None else args.cfg
      tmp = tempfile.mkdtemp(dir=tmp_root)
      project = Worker("project (JAX)", SCRIPT, ["--worker", "jax"], env)
      peer = Worker("peer (diffusers, PyTorch)", SCRIPT, ["--worker", "torch"], env)
      try:
        setup = dict(cmd="setup", path=path, steps=args.steps, batch=args.batch, cfg=cfg, block=block,
                     prompts=d["prompts"], tmp=tmp, gelu=args.peer_gelu)
        a = project.ask(**setup)
        b = peer.ask(**{**setup, "path": a["path"]}, inputs=a["inputs"])
        compared = "final latents (before the VAE decode)" if a["has_vae"] else "final pixels (no VAE)"
        print(f"\n{name}: {a['image_size']}px, latents {a['latent_shape']}, {args.steps} DDIM steps "
              f"(t {a['timesteps'][0]}..{a['timesteps'][-1]}), CFG {cfg}, batch {args.batch}, block {block} "
              f"({b['block_class']}, d_in {a['d_in']}); project setup {a['setup_s']:.1f} s, peer setup "
              f"(export + load) {b['setup_s']:.1f} s")
        print(f"  clamp: SAE k {SAE_K}, {a['d_in'] * SAE_EXPANSION} latents; clamped {a['clamp_latents']} "
              f"(selected at {a['clamp_latent_hits_step0']} of {a['tokens_step0']} tokens on step 0)")
        outs = {}
        for v in variants:
          p_file, q_file = os.path.join(tmp, f"project_{v}.npz"), os.path.join(tmp, f"peer_{v}.npz")
          pr = project.ask(cmd="sample", variant=v, out=p_file)
          qr = peer.ask(cmd="sample", variant=v, out=q_file, threads=threads[0])
          other = "exact" if args.peer_gelu == "tanh" else "tanh"
          o_file = os.path.join(tmp, f"peer_{other}_{v}.npz")
          peer.ask(cmd="sample", variant=v, out=o_file, threads=threads[0], gelu=other)
          p, q, o = np.load(p_file), np.load(q_file), np.load(o_file)
          outs[v] = p["latents"]
          agree = {"latents": _diff(p["latents"], q["latents"]), "images": _diff(p["images"], q["images"]),
                   f"latents_peer_gelu_{other}": _diff(p["latents"], o["latents"])}
          if v != "plain" and "plain" in outs:
            agree["effect_vs_plain"] = _diff(p["latents"], outs["plain"])
          limit = args.tol * max(1.0, agree["latents"]["scale"])
          agree["limit"] = limit
          ok = agree["latents"]["max_abs"] <= limit
          la, im = agree["latents"], agree["images"]
          eff = (f"; the clamp moves the project's latents by max {agree['effect_vs_plain']['max_abs']:.3g} "
                 f"(mean {agree['effect_vs_plain']['mean_abs']:.3g})" if "effect_vs_plain" in agree else "")
          print(f"  {v:6s} agreement on the {compared}: max |diff| {la['max_abs']:.3g}, mean {la['mean_abs']:.3g} "
                f"(max |value| {la['scale']:.3g}); images [0,1]: max {im['max_abs']:.3g}, mean {im['mean_abs']:.3g}"
                f"{eff}  -> {'OK' if ok else 'FAIL'} (limit {limit:.3g} = tol {args.tol:g} x max(1, max |value|))",
                flush=True)
          ot = agree[f"latents_peer_gelu_{other}"]
          print(f"         the peer with GEGLU's {other} GELU instead: max |diff| {ot['max_abs']:.3g}, "
                f"mean {ot['mean_abs']:.3g} (not checked)", flush=True)
          if not ok:
            failures.append(f"{name} {v}: max |project - peer| {la['max_abs']:.3g} > {limit:.3g} "
                            f"(tol {args.tol:g} x max(1, {la['scale']:.3g}))")
            continue
          rounds = []
          for r in range(args.rounds):
            row = {"round": r}
            order = [("project", None)] + [("peer", t) for t in threads]
            if r % 2:
              order = order[::-1]  # A B C, C B A, ...: neither side always follows the other
            for side, t in order:
              before = loadavg()
              if side == "project":
                res = project.ask(cmd="run", variant=v)
                row.update(project=args.batch / res["run_s"], load_project=[before, loadavg()])
              else:
                res = peer.ask(cmd="run", variant=v, threads=t)
                row[f"peer_{t}t"] = args.batch / res["run_s"]
                row[f"load_peer_{t}t"] = [before, loadavg()]
            rounds.append(row)
            print(f"    round {r}: project {row['project']:.2f} img/s (load {row['load_project'][0]}), "
                  + ", ".join(f"peer {t}t {row[f'peer_{t}t']:.2f} (load {row[f'load_peer_{t}t'][0]})"
                              for t in threads), flush=True)
          med = {key: statistics.median(rw[key] for rw in rounds)
                 for key in ["project"] + [f"peer_{t}t" for t in threads]}
          results.append({
              "model": name, "variant": v, "image_size": a["image_size"], "latent_shape": a["latent_shape"],
              "steps": args.steps, "batch": args.batch, "cfg": cfg, "block": block,
              "clamp": {"k": SAE_K, "n_latents": a["d_in"] * SAE_EXPANSION, "entries": CLAMP_ENTRIES,
                        "latents": a["clamp_latents"]} if v == "clamp" else None,
              "compared": compared, "agreement": agree, "tol": args.tol, "peer_gelu": args.peer_gelu,
              "project_compile_s": a["compile_s"][v], "project_first_run_s": pr["first_run_s"],
              "peer_first_run_s": qr["first_run_s"],
              "project_images_per_s": med["project"],
              **{f"peer_{t}t_images_per_s": med[f"peer_{t}t"] for t in threads},
              **{f"ratio_vs_peer_{t}t": med["project"] / med[f"peer_{t}t"] for t in threads},
              "device": a["device"], "jax": a["jax"], "torch": b["torch"], "rounds": rounds})
      finally:
        project.close()
        peer.close()
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  if failures:
    print("\nFAIL: the project's sampler and diffusers disagree:\n  " + "\n  ".join(failures), file=sys.stderr)
    print(f"(nothing written to {args.json_out})", file=sys.stderr)
    sys.exit(1)
  print(f"\nmedians over {args.rounds} rounds, {args.steps} DDIM steps with CFG, batch {args.batch} "
        f"(load average per round in the JSON)")
  head = (f"{'model':12s} {'variant':7s} {'compile s':>9s} {'project':>8s} "
          + " ".join(f"{f'peer {t}t':>8s} {f'x{t}t':>6s}" for t in threads) + f" {'max diff':>9s}")
  print(head)
  for s in results:
    print(f"{s['model']:12s} {s['variant']:7s} {s['project_compile_s']:9.1f} {s['project_images_per_s']:8.2f} "
          + " ".join(f"{s[f'peer_{t}t_images_per_s']:8.2f} {s[f'ratio_vs_peer_{t}t']:6.2f}" for t in threads)
          + f" {s['agreement']['latents']['max_abs']:9.2g}")
  print("images/s; xNt: project / peer with N torch threads; compile s: the project's lower + compile, apart "
        "from run time; max diff: max |project - peer| on the final latents")
  write_results(args.json_out, cpus, results)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    become_worker()
    jax_worker() if sys.argv[2] == "jax" else torch_worker()
  else:
    main()
