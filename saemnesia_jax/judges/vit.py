"""The UnlearnCanvas classifiers' architecture in Flax: a timm ViT checkpoint
(PyTorch or safetensors) loaded into transformers' ``FlaxViTForImageClassification``
(through ``diffusion/models.py``), and its features and logits."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from safetensors.numpy import load_file

from saemnesia_jax.diffusion import models


def _timm_state_dict(file: str) -> dict[str, np.ndarray]:
  """A timm checkpoint as numpy: a state dict, or a dict holding one under
  'model_state_dict' / 'state_dict' / 'model' (as training scripts save it)."""
  if file.endswith(".safetensors"):
    return load_file(file)
  try:
    import torch  # deferred: torch is optional
  except ImportError as e:
    raise models.ModelLoadError(f"{file} is a PyTorch checkpoint; reading it needs torch "
                         "(`pip install saemnesia_jax[torch]`)") from e
  obj = torch.load(file, map_location="cpu", weights_only=True)
  for key in ("model_state_dict", "state_dict", "model"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  return {k: v.float().numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in obj.items()}


def vit_from_timm(file: str, num_heads: int = 0, layer_norm_eps: float = 1e-6,
                  dtype: str = "float32") -> tuple[Any, dict]:
  """(FlaxViTForImageClassification, params) from a timm ``VisionTransformer``
  checkpoint (class token, pre-norm blocks, fused qkv, ``head`` on the class
  token; e.g. ``vit_large_patch16_224`` with a new head, as the UnlearnCanvas
  classifiers are). Sizes are read from the weights; ``num_heads`` 0 means
  width / 64, as every standard ViT has. The module takes NCHW pixels.
  """
  sd = _timm_state_dict(file)
  need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight")
  missing = [k for k in need if k not in sd]
  if missing:
    raise models.ModelLoadError(f"{file} is not a timm ViT classifier: no {missing} among its "
                         f"{len(sd)} tensors (e.g. {sorted(sd)[:4]})")
  width = sd["cls_token"].shape[-1]
  patch = sd["patch_embed.proj.weight"].shape[-1]
  n_tokens = sd["pos_embed"].shape[1] - 1
  side = int(round(n_tokens ** 0.5))
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  heads = num_heads or max(1, width // 64)
  config = models.ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                     intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0], image_size=side * patch,
                     patch_size=patch, num_labels=sd["head.weight"].shape[0], layer_norm_eps=layer_norm_eps,
                     hidden_act="gelu", qkv_bias="blocks.0.attn.qkv.bias" in sd)
  t = lambda w: np.ascontiguousarray(w.T)  # torch Linear (out, in) -> flax Dense (in, out)
  layers = {}
  for i in range(depth):
    b = f"blocks.{i}."
    qkv_w = np.split(sd[b + "attn.qkv.weight"], 3, axis=0)
    qkv_b = np.split(sd[b + "attn.qkv.bias"], 3) if config.qkv_bias else [None] * 3
    attn = {name: {"kernel": t(w), **({"bias": bb} if bb is not None else {})}
            for name, w, bb in zip(("query", "key", "value"), qkv_w, qkv_b)}
    layers[str(i)] = {
        "layernorm_before": {"scale": sd[b + "norm1.weight"], "bias": sd[b + "norm1.bias"]},
        "attention": {"attention": attn, "output": {"dense": {
            "kernel": t(sd[b + "attn.proj.weight"]), "bias": sd[b + "attn.proj.bias"]}}},
        "layernorm_after": {"scale": sd[b + "norm2.weight"], "bias": sd[b + "norm2.bias"]},
        "intermediate": {"dense": {"kernel": t(sd[b + "mlp.fc1.weight"]), "bias": sd[b + "mlp.fc1.bias"]}},
        "output": {"dense": {"kernel": t(sd[b + "mlp.fc2.weight"]), "bias": sd[b + "mlp.fc2.bias"]}},
    }
  params = {
      "vit": {
          "embeddings": {
              "cls_token": sd["cls_token"], "position_embeddings": sd["pos_embed"],
              "patch_embeddings": {"projection": {
                  "kernel": np.ascontiguousarray(sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)),
                  "bias": sd["patch_embed.proj.bias"]}}},
          "encoder": {"layer": layers},
          "layernorm": {"scale": sd["norm.weight"], "bias": sd["norm.bias"]},
      },
      "classifier": {"kernel": t(sd["head.weight"]), "bias": sd["head.bias"]},
  }
  model = models.FlaxViTForImageClassification(config, dtype=models.parse_dtype(dtype), _do_init=False)
  size = side * patch  # init_weights takes NHWC (the wrapper's __call__ transposes NCHW)
  bad = models.tree_mismatches(jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, size, size, 3))),
                         params)
  if bad:
    raise models.ModelLoadError(f"{file}: the timm ViT weights do not map onto a ViT of width {width}, depth {depth}, "
                         f"{heads} heads: {bad[:4]}")
  return model, models.cast_params(jax.tree_util.tree_map(jnp.asarray, params), models.parse_dtype(dtype))


def vit_features_and_logits(model: Any, params: dict, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(class-token features, logits) of a ``FlaxViTForImageClassification`` for
  NCHW pixels: the features are what its classifier head reads (after the
  final layer norm), for the evaluation's image-quality measure."""

  def head(m, x):
    feats = m.vit(x, deterministic=True)[0][:, 0]
    return feats, m.classifier(feats)
  x = jnp.transpose(pixel_values, (0, 2, 3, 1))  # the wrapper's own NCHW -> NHWC
  return nn.apply(head, model.module)({"params": params}, x)
