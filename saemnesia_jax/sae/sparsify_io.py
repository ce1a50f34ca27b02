"""Import and export of SAEs in EleutherAI sparsify's layout (docs/method.md section 8).

A sparsify SAE is a folder (one per hooked block) holding:

- ``cfg.json``: ``expansion_factor``, ``num_latents`` (0 = expansion_factor *
  d_in), ``k``, ``batch_topk``, ``sample_topk``, ``input_unit_norm``,
  ``multi_topk``, ``normalize_decoder`` and ``d_in``;
- ``sae.safetensors``: ``encoder.weight`` (n_latents, d_in), ``encoder.bias``
  (n_latents,), ``W_dec`` (n_latents, d_in), ``b_dec`` (d_in,).

Our parameters (see ``sae/model.py``) store the encoder transposed:
``W_enc = encoder.weight.T``.  Read and written with safetensors' numpy API,
so no torch is needed; bfloat16 files load through ml_dtypes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import DiskFullError, atomic_write_bytes, atomic_write_json, disk_full, read_json, write_point

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# sparsify tensor name -> (our name, transpose?)
_TENSORS = {
    "encoder.weight": ("W_enc", True),
    "encoder.bias": ("b_enc", False),
    "W_dec": ("W_dec", False),
    "b_dec": ("b_dec", False),
}

_DEFAULT_CFG = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "batch_topk": False,
    "sample_topk": False,
    "input_unit_norm": False,
    "multi_topk": False,
}

# Options whose True value changes what the SAE computes at inference.
_UNSUPPORTED = {
    "input_unit_norm": "input_unit_norm=True (inputs rescaled to unit norm before encoding, output "
                       "rescaled back) is not implemented by saemnesia_jax.sae.model",
    "skip_connection": "skip_connection=True (a W_skip linear path) is not implemented by saemnesia_jax.sae.model",
    "transcode": "transcode=True (a transcoder: predicts another layer's output) is not supported",
}
# Options that only change sparsify's training objective: the weights are still usable.
_TRAINING_ONLY = {
    "multi_topk": "multi_topk=True (Multi-TopK training loss) is not implemented by saemnesia_jax",
    "sample_topk": "sample_topk=True (TopK per whole sample during training) is not implemented by saemnesia_jax",
}


class SparsifyFormatError(UserError):
  """A folder that is not a sparsify SAE we can read, with what is wrong."""


def _n_latents(cfg: dict[str, Any]) -> int:
  n = int(cfg.get("num_latents") or 0)
  return n if n > 0 else int(cfg["expansion_factor"]) * int(cfg["d_in"])


def load_sparsify(folder: str, dtype: Any = None,
                  allow_training_only_options: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Loads a sparsify SAE folder into (params, cfg).

  Args:
    folder: the folder of one hooked block (holds cfg.json and sae.safetensors).
    dtype: cast the arrays to this dtype; None keeps the stored one.
    allow_training_only_options: accept multi_topk / sample_topk = True (they
      only alter sparsify's training loss, so the weights encode and decode
      the same); otherwise they raise, since training here would differ.
  Returns:
    params: numpy arrays in the layout of ``saemnesia_jax.sae.model``.
    cfg: cfg.json's content with ``d_in`` and ``num_latents`` filled in.
  Raises:
    SparsifyFormatError for a missing file, a bad config, a missing, extra or
    misshapen tensor, or an unsupported option.
  """
  cfg_path = os.path.join(folder, CFG_FILE)
  st_path = os.path.join(folder, WEIGHTS_FILE)
  if not os.path.isdir(folder):
    raise SparsifyFormatError(f"{folder}: no such folder (expected a sparsify SAE folder with "
                              f"{CFG_FILE} and {WEIGHTS_FILE}).")
  for path in (cfg_path, st_path):
    if not os.path.isfile(path):
      subs = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CFG_FILE)))
      hint = (f" It holds SAE folders {subs}: pass one of them (one folder per hooked block)."
              if subs else "")
      raise SparsifyFormatError(f"{folder}: missing {os.path.basename(path)}; a sparsify SAE folder holds "
                                f"{CFG_FILE} and {WEIGHTS_FILE}.{hint}")

  cfg = {**_DEFAULT_CFG, **read_json(cfg_path)}
  if cfg.get("d_in") is None:
    raise SparsifyFormatError(f"{cfg_path}: no 'd_in' (sparsify writes it next to the SaeConfig fields).")
  for key, why in _UNSUPPORTED.items():
    if cfg.get(key):
      raise SparsifyFormatError(f"{cfg_path}: {why}.")
  if cfg["activation"] != "topk":
    # sparsify's 'groupmax' keeps the largest latent of each of k groups: other
    # latents fire, so running it as TopK would give other codes and decodes.
    raise SparsifyFormatError(f"{cfg_path}: activation {cfg['activation']!r} is not supported; saemnesia_jax "
                              "runs TopK SAEs only (activation 'topk').")
  for key, why in _TRAINING_ONLY.items():
    if cfg.get(key) and not allow_training_only_options:
      raise SparsifyFormatError(f"{cfg_path}: {why}; the weights are usable for inference: pass "
                                f"allow_training_only_options=True to load them anyway.")
  d_in, n_latents = int(cfg["d_in"]), _n_latents(cfg)
  cfg["d_in"], cfg["num_latents"] = d_in, n_latents

  try:
    tensors = load_file(st_path)
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise SparsifyFormatError(f"{st_path}: cannot read as safetensors ({type(e).__name__}: {e}).") from e
  expected = {"encoder.weight": (n_latents, d_in), "encoder.bias": (n_latents,),
              "W_dec": (n_latents, d_in), "b_dec": (d_in,)}
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  if missing or extra:
    raise SparsifyFormatError(f"{st_path}: expected tensors {sorted(expected)}; missing {missing}, "
                              f"unexpected {extra} (unexpected tensors would change the forward pass).")
  for name, shape in expected.items():
    if tensors[name].shape != shape:
      raise SparsifyFormatError(f"{st_path}: tensor {name!r} has shape {tensors[name].shape}, but cfg.json "
                                f"(d_in={d_in}, num_latents={n_latents}) implies {shape}.")
  params = {}
  for name, (ours, transpose) in _TENSORS.items():
    a = tensors[name].T if transpose else tensors[name]
    params[ours] = np.ascontiguousarray(a if dtype is None else a.astype(dtype))
  return params, cfg


def save_sparsify(params: dict[str, Any], cfg: dict[str, Any], folder: str, overwrite: bool = False) -> None:
  """Writes params (layout of ``saemnesia_jax.sae.model``) as a sparsify SAE folder.

  ``cfg`` needs ``k``; other sparsify fields default to sparsify's values, and
  ``d_in``, ``num_latents`` and ``expansion_factor`` are set from the shapes
  (a conflicting value in cfg raises).  Keys that are not sparsify fields are
  dropped.  Atomic: both files are written into a temporary folder next to
  ``folder``, which is then renamed into place; an existing ``folder`` is
  replaced only with ``overwrite=True``.
  """
  params = {k: np.asarray(v) for k, v in params.items()}
  if set(params) != {ours for ours, _ in _TENSORS.values()}:
    raise ValueError(f"save_sparsify: params must have keys W_enc, b_enc, W_dec, b_dec; got {sorted(params)}.")
  d_in, n_latents = params["W_enc"].shape
  shapes = {"W_enc": (d_in, n_latents), "b_enc": (n_latents,), "W_dec": (n_latents, d_in), "b_dec": (d_in,)}
  for name, shape in shapes.items():
    if params[name].shape != shape:
      raise ValueError(f"save_sparsify: {name} has shape {params[name].shape}, expected {shape} "
                       f"(from W_enc {(d_in, n_latents)}).")
  if "k" not in cfg:
    raise ValueError("save_sparsify: cfg needs 'k' (the TopK of the SAE).")
  for key, value in (("d_in", d_in), ("num_latents", n_latents)):
    if cfg.get(key) not in (None, 0, value):
      raise ValueError(f"save_sparsify: cfg[{key!r}]={cfg[key]} disagrees with the parameters ({value}).")
  out_cfg = {key: cfg.get(key, default) for key, default in _DEFAULT_CFG.items()}
  out_cfg.update(d_in=d_in, num_latents=n_latents, k=int(cfg["k"]),
                 expansion_factor=max(n_latents // d_in, 1))
  for key in _UNSUPPORTED:
    if cfg.get(key):
      raise ValueError(f"save_sparsify: {_UNSUPPORTED[key]}.")
  if out_cfg["activation"] != "topk":
    raise ValueError(f"save_sparsify: activation {out_cfg['activation']!r}; these parameters are a TopK SAE.")

  tensors = {}
  for name, (ours, transpose) in _TENSORS.items():
    tensors[name] = np.ascontiguousarray(params[ours].T if transpose else params[ours])

  folder = os.path.abspath(folder)
  if os.path.exists(folder) and not overwrite:
    raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it.")
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  for stale in os.listdir(parent):  # a killed export's: a whole SAE each
    if stale.startswith((f".tmp-{os.path.basename(folder)}-", f".old-{os.path.basename(folder)}-")):
      shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(folder)}-")
  try:
    try:
      atomic_write_bytes(os.path.join(tmp, WEIGHTS_FILE), safetensors_bytes(tensors))
      atomic_write_json(os.path.join(tmp, CFG_FILE), out_cfg)
    except DiskFullError as e:  # name the folder the user asked for, not the temp one
      raise disk_full(folder, e.__cause__) from e.__cause__
    write_point()
    if os.path.exists(folder):
      # Move the old folder aside first: rename cannot replace a non-empty folder.
      old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(folder)}-")
      os.rename(folder, os.path.join(old, "sae"))
      os.rename(tmp, folder)
      shutil.rmtree(old)
    else:
      os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
