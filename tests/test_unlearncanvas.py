"""The UnlearnCanvas judge: timm ViT checkpoints mapped onto transformers' Flax
ViT agree with a numpy ViT written from timm's definition, and class names map
to the config's concept ids."""
import ml_collections
import numpy as np
import pytest
import torch

from saemnesia_jax.evaluation import concepts
from saemnesia_jax import evaluate
from saemnesia_jax.diffusion import models
from saemnesia_jax.judges import vit
from saemnesia_jax.evaluation import unlearncanvas
from saemnesia_jax import judges
from saemnesia_jax.judges import unlearncanvas as uc_judge

WIDTH, DEPTH, HEADS, PATCH, SIZE, MLP = 32, 2, 2, 16, 32, 64


def _timm_state_dict(n_classes, seed):
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  n_tok = (SIZE // PATCH) ** 2 + 1
  sd = {"cls_token": r(1, 1, WIDTH), "pos_embed": r(1, n_tok, WIDTH),
        "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
        "norm.weight": 1 + r(WIDTH), "norm.bias": r(WIDTH), "head.weight": r(n_classes, WIDTH),
        "head.bias": r(n_classes)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(WIDTH), b + "norm1.bias": r(WIDTH),
               b + "attn.qkv.weight": r(3 * WIDTH, WIDTH), b + "attn.qkv.bias": r(3 * WIDTH),
               b + "attn.proj.weight": r(WIDTH, WIDTH), b + "attn.proj.bias": r(WIDTH),
               b + "norm2.weight": 1 + r(WIDTH), b + "norm2.bias": r(WIDTH),
               b + "mlp.fc1.weight": r(MLP, WIDTH), b + "mlp.fc1.bias": r(MLP),
               b + "mlp.fc2.weight": r(WIDTH, MLP), b + "mlp.fc2.bias": r(WIDTH)})
  return sd


def _save(path, sd):
  # As UnlearnCanvas' training script saves it: the state dict under 'model_state_dict'.
  torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, path)
  return str(path)


def _numpy_vit(sd, images_nhwc, features=False):
  """timm's VisionTransformer forward: class token, pre-norm blocks, head on the class token."""
  from math import erf
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
  ln = lambda x, w, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w + b
  x = images_nhwc.transpose(0, 3, 1, 2)  # NCHW, as torch
  n, g = len(x), SIZE // PATCH
  patches = x.reshape(n, 3, g, PATCH, g, PATCH).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
  tok = patches @ sd["patch_embed.proj.weight"].reshape(WIDTH, -1).T + sd["patch_embed.proj.bias"]
  tok = np.concatenate([np.repeat(sd["cls_token"], n, 0), tok], 1) + sd["pos_embed"]
  hd = WIDTH // HEADS
  for i in range(DEPTH):
    b = f"blocks.{i}."
    h = ln(tok, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
    qkv = (h @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(n, -1, 3, HEADS, hd)
    q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(n, -1, WIDTH)
    tok = tok + o @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
    h = ln(tok, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
    h = gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
    tok = tok + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
  cls = ln(tok, sd["norm.weight"], sd["norm.bias"])[:, 0]
  return cls if features else cls @ sd["head.weight"].T + sd["head.bias"]


def test_timm_vit_maps_onto_flax_vit(tmp_path):
  sd = _timm_state_dict(5, 0)
  model, params = vit.vit_from_timm(_save(tmp_path / "c.pth", sd), num_heads=HEADS)
  x = np.random.default_rng(1).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
  got = np.asarray(model(x.transpose(0, 3, 1, 2), params=params).logits)
  np.testing.assert_allclose(got, _numpy_vit(sd, x), atol=2e-4, rtol=2e-4)


def test_judge_maps_classes_to_concept_ids(tmp_path):
  objects_cls, styles_cls = ("Bears", "Cats", "Dogs"), ("Pastel", "Seed_Images", "Van_Gogh", "Winter")
  obj_sd, sty_sd = _timm_state_dict(3, 2), _timm_state_dict(4, 3)
  judge = uc_judge.ViTJudge(
      _save(tmp_path / "o.pth", obj_sd), _save(tmp_path / "s.pth", sty_sd),
      objects=("Dogs", "Bears", "Cats"), styles=("Van_Gogh", "Pastel"),  # Winter is not evaluated
      object_classes=objects_cls, style_classes=styles_cls, batch_size=4, num_heads=HEADS)
  x = np.random.default_rng(4).uniform(0, 1, (6, SIZE, SIZE, 3)).astype(np.float32)  # 2 batches, padded
  obj, sty = judge.predict(x)
  ref_obj = np.argmax(_numpy_vit(obj_sd, (x - 0.5) / 0.5), -1)
  ref_sty = np.argmax(_numpy_vit(sty_sd, (x - 0.5) / 0.5), -1)
  np.testing.assert_array_equal(obj, np.array([1, 2, 0])[ref_obj])  # Bears -> 1, Cats -> 2, Dogs -> 0
  np.testing.assert_array_equal(sty, np.array([1, concepts.NO_STYLE, 0, -2])[ref_sty])
  # The quality measures' inputs: class-token features and the winning class's probability.
  a = judge.assess(x)
  np.testing.assert_array_equal(a["object"], obj)
  np.testing.assert_array_equal(a["style"], sty)
  want = np.concatenate([_numpy_vit(sd, (x - 0.5) / 0.5, features=True) for sd in (obj_sd, sty_sd)], -1)
  np.testing.assert_allclose(a["features"], want, atol=2e-4, rtol=2e-4)
  logits = _numpy_vit(sty_sd, (x - 0.5) / 0.5)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(a["style_conf"], (p / p.sum(-1, keepdims=True)).max(-1), atol=1e-4)


def test_bad_inputs_name_the_problem(tmp_path):
  with pytest.raises(models.ModelLoadError, match="not a timm ViT classifier"):
    vit.vit_from_timm(_save(tmp_path / "x.pth", {"weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(KeyError, match="no class for \\['tigers'\\]"):
    unlearncanvas.class_map(unlearncanvas.OBJECT_CLASSES, ("Bears", "Tigers"), "object")
  with pytest.raises(FileNotFoundError, match="style_classifier.pth"):
    unlearncanvas.find_classifier(str(tmp_path), "style")
  config = ml_collections.ConfigDict({"evaluate": {"classifier": "unlearncanvas", "classifier_dir": ""}})
  with pytest.raises(ValueError, match="needs config.evaluate.classifier_dir"):
    judges.make_judge(config)
  config.evaluate.classifier = "clip"
  with pytest.raises(ValueError, match="'canvas_mini', 'canvas_mini_no_object' and 'unlearncanvas'"):
    judges.make_judge(config)
