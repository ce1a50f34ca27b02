"""Flax pipeline weights -> PyTorch weights (diffusers' and transformers'
torch classes, through ``models.torch_side``): what ``tiny.write_tiny_pipeline``
uses for fmt='pt', so that PyTorch loading is tested on checkpoints the tests
write themselves. Needs torch (optional)."""
from __future__ import annotations

import os

import numpy as np
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict, unflatten_dict

from saemnesia_jax.diffusion import models


def _poison(model) -> None:
  """Fills every float tensor of a torch model with NaN, so that a weight the
  conversion does not fill is found afterwards (``_unfilled``)."""
  import torch  # deferred: torch is optional
  with torch.no_grad():
    for t in model.state_dict().values():
      if t.is_floating_point():
        t.fill_(float("nan"))


def _unfilled(model) -> list[str]:
  import torch  # deferred: torch is optional
  return [k for k, t in model.state_dict().items() if t.is_floating_point() and bool(torch.isnan(t).any())]


def _load_linear_pairs(module, state: dict) -> None:
  """Flax Dense weights {(name, 'kernel'|'bias'): array} into torch Linear layers of ``module``."""
  import torch  # deferred: torch is optional
  sd = module.state_dict()
  with torch.no_grad():
    for (name, leaf), v in state.items():
      key = f"{name}.{'weight' if leaf == 'kernel' else 'bias'}"
      sd[key].copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(v, np.float32).T if leaf == "kernel" else v)))


def convert_to_pytorch(folder: str, safetensors: bool) -> None:
  """Replaces the Flax weights in ``folder`` by PyTorch ones (same values).

  Every weight of the torch model must be filled: a name the library
  converters do not map raises ``models.ModelLoadError`` instead of leaving torch's
  random initial values in the export.
  """
  try:
    import torch  # noqa: F401  (deferred: torch is optional)
  except ImportError as e:
    raise models.ModelLoadError("writing PyTorch weights needs torch (`pip install torch==2.13.0`)") from e
  pt = models.torch_side()
  for sub, cls, flax_name in (("unet", pt.UNet2DConditionModel, models.UNET_FLAX_WEIGHTS),
                              ("vae", pt.AutoencoderKL, models.VAE_FLAX_WEIGHTS),
                              ("text_encoder", pt.CLIPTextModel, models.TEXT_FLAX_WEIGHTS)):
    d = os.path.join(folder, sub)
    if not os.path.isdir(d):
      continue
    # from_pretrained(from_flax=True) fails here in both libraries (diffusers
    # 0.39 re-reads the msgpack as a torch file; transformers 4.57 leaves
    # meta tensors), so build the torch model and convert the weights directly.
    if sub == "text_encoder":
      model = cls(pt.CLIPTextConfig.from_pretrained(d))
      _poison(model)
      model = pt.load_flax_checkpoint_in_pytorch_model(model, os.path.join(d, flax_name))
    else:
      with open(os.path.join(d, flax_name), "rb") as f:
        state = flatten_dict(msgpack_restore(f.read()))
      if sub == "vae":
        state = {tuple(models._VAE_ATTN_FLAX_TO_PT.get(p, p) for p in k): v for k, v in state.items()}
      # diffusers' converter turns 'linear_1' into 'linear.1' outside
      # time_embedding, so SDXL's text_time add_embedding is loaded here.
      add = {k[1:]: state.pop(k) for k in list(state) if k[0] == "add_embedding"}
      model = cls.from_config(cls.load_config(d))
      _poison(model)
      model = pt.load_flax_weights_in_pytorch_model(model, unflatten_dict(state))
      if add:
        _load_linear_pairs(model.add_embedding, add)
    missing = _unfilled(model)
    if missing:
      raise models.ModelLoadError(f"exporting {d} to PyTorch left {len(missing)} weights unset "
                           f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): the Flax and "
                           "PyTorch names do not map; nothing was written")
    os.remove(os.path.join(d, flax_name))
    model.save_pretrained(d, safe_serialization=safetensors or sub == "text_encoder")
