"""Tests of saemnesia_jax.sae.sparsify_io: round trip, files written by torch, bad folders."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.sae import model as sae
from saemnesia_jax.sae import sparsify_io as sio

D_IN, N_LAT, K = 6, 24, 3


def _random_params(seed=0, dtype=np.float32):
  r = np.random.default_rng(seed)
  return {"W_enc": r.normal(size=(D_IN, N_LAT)).astype(dtype), "b_enc": r.normal(size=N_LAT).astype(dtype),
          "W_dec": r.normal(size=(N_LAT, D_IN)).astype(dtype), "b_dec": r.normal(size=D_IN).astype(dtype)}


def _write_cfg(folder, cfg_overrides=None):
  cfg = {"expansion_factor": N_LAT // D_IN, "normalize_decoder": True, "num_latents": 0, "k": K,
         "batch_topk": True, "sample_topk": False, "input_unit_norm": False, "multi_topk": False, "d_in": D_IN}
  cfg.update(cfg_overrides or {})
  with open(os.path.join(folder, "cfg.json"), "w") as f:
    json.dump(cfg, f)


def _numpy_folder(folder, cfg_overrides=None, tensors_overrides=None):
  """A sparsify-layout folder written with safetensors' numpy API (no torch)."""
  from safetensors.numpy import save_file
  p = _random_params()
  state = {"encoder.weight": p["W_enc"].T.copy(), "encoder.bias": p["b_enc"], "W_dec": p["W_dec"],
           "b_dec": p["b_dec"]}
  state.update(tensors_overrides or {})
  os.makedirs(folder, exist_ok=True)
  save_file({k: v for k, v in state.items() if v is not None}, os.path.join(folder, "sae.safetensors"))
  _write_cfg(folder, cfg_overrides)


def _torch_folder(folder, dtype=None):
  """A folder as sparsify (PyTorch) writes it; returns the torch state dict."""
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  g = torch.Generator().manual_seed(0)
  state = {"encoder.weight": torch.randn(N_LAT, D_IN, generator=g), "encoder.bias": torch.randn(N_LAT, generator=g),
           "W_dec": torch.randn(N_LAT, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
  if dtype is not None:
    state = {k: v.to(dtype) for k, v in state.items()}
  os.makedirs(folder, exist_ok=True)
  save_file(state, os.path.join(folder, "sae.safetensors"))
  _write_cfg(folder)
  return state


def test_round_trip_is_bit_exact(tmp_path):
  params = _random_params()
  folder = str(tmp_path / "up_blocks.1.attentions.1")
  sio.save_sparsify(params, {"k": K, "batch_topk": True, "lr": 4e-4}, folder)
  loaded, cfg = sio.load_sparsify(folder)
  for k in params:
    assert loaded[k].dtype == params[k].dtype
    np.testing.assert_array_equal(loaded[k], params[k], err_msg=k)
  assert cfg["d_in"] == D_IN and cfg["num_latents"] == N_LAT and cfg["k"] == K and cfg["batch_topk"] is True
  assert "lr" not in cfg  # only sparsify fields are written
  assert sorted(os.listdir(tmp_path)) == ["up_blocks.1.attentions.1"]  # no temp folders left


def test_overwrite(tmp_path):
  folder = str(tmp_path / "sae")
  sio.save_sparsify(_random_params(0), {"k": K}, folder)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    sio.save_sparsify(_random_params(1), {"k": K}, folder)
  np.testing.assert_array_equal(sio.load_sparsify(folder)[0]["b_dec"], _random_params(0)["b_dec"])
  sio.save_sparsify(_random_params(1), {"k": K}, folder, overwrite=True)
  np.testing.assert_array_equal(sio.load_sparsify(folder)[0]["b_dec"], _random_params(1)["b_dec"])
  assert sorted(os.listdir(tmp_path)) == ["sae"]


def test_save_validates(tmp_path):
  params = _random_params()
  with pytest.raises(ValueError, match="needs 'k'"):
    sio.save_sparsify(params, {}, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="num_latents"):
    sio.save_sparsify(params, {"k": K, "num_latents": 7}, str(tmp_path / "a"))
  with pytest.raises(ValueError, match="b_dec has shape"):
    sio.save_sparsify({**params, "b_dec": np.zeros(D_IN + 1, np.float32)}, {"k": K}, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a")


def test_torch_written_folder_loads_and_computes_like_torch(tmp_path):
  torch = pytest.importorskip("torch")
  state = _torch_folder(str(tmp_path / "hook"))
  params, cfg = sio.load_sparsify(str(tmp_path / "hook"))
  np.testing.assert_array_equal(params["W_enc"], state["encoder.weight"].numpy().T)
  np.testing.assert_array_equal(params["b_enc"], state["encoder.bias"].numpy())
  np.testing.assert_array_equal(params["W_dec"], state["W_dec"].numpy())
  np.testing.assert_array_equal(params["b_dec"], state["b_dec"].numpy())
  assert cfg["num_latents"] == N_LAT  # num_latents 0 -> expansion_factor * d_in

  # sparsify's forward in torch: ReLU(Linear(x - b_dec)), per-token TopK, z @ W_dec + b_dec.
  x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))
  pre = torch.relu(torch.nn.functional.linear(x - state["b_dec"], state["encoder.weight"], state["encoder.bias"]))
  vals, idx = pre.topk(K)
  z = torch.zeros_like(pre).scatter_(-1, idx, vals)
  out = z @ state["W_dec"] + state["b_dec"]
  p = {k: jnp.asarray(v) for k, v in params.items()}
  xj = jnp.asarray(x.numpy())
  np.testing.assert_allclose(sae.encode(p, xj, K), z.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae.decode(p, sae.encode(p, xj, K)), out.numpy(), rtol=1e-5, atol=1e-5)


def test_bfloat16_torch_file(tmp_path):
  torch = pytest.importorskip("torch")
  state = _torch_folder(str(tmp_path / "hook"), dtype=torch.bfloat16)
  params, _ = sio.load_sparsify(str(tmp_path / "hook"), dtype=np.float32)
  assert params["W_dec"].dtype == np.float32
  np.testing.assert_array_equal(params["W_dec"], state["W_dec"].float().numpy())


def test_bad_folders_give_clear_errors(tmp_path):
  with pytest.raises(sio.SparsifyFormatError, match="no such folder"):
    sio.load_sparsify(str(tmp_path / "nope"))

  root = tmp_path / "ckpt"
  _numpy_folder(str(root / "unet.up_blocks.1.attentions.1"))
  with pytest.raises(sio.SparsifyFormatError, match=r"missing cfg.json.*unet.up_blocks.1.attentions.1"):
    sio.load_sparsify(str(root))  # a checkpoint root, not one SAE folder

  no_weights = tmp_path / "no_weights"
  _numpy_folder(str(no_weights))
  os.remove(no_weights / "sae.safetensors")
  with pytest.raises(sio.SparsifyFormatError, match="missing sae.safetensors"):
    sio.load_sparsify(str(no_weights))

  cases = {
      "shape": ({}, {"W_dec": np.zeros((N_LAT, D_IN + 1), np.float32)}, r"'W_dec' has shape \(24, 7\).*\(24, 6\)"),
      "cfg_latents": ({"num_latents": 12}, None, r"'encoder.weight' has shape \(24, 6\).*num_latents=12"),
      "missing": ({}, {"encoder.bias": None}, r"missing \['encoder.bias'\]"),
      "extra": ({}, {"W_skip": np.zeros((D_IN, D_IN), np.float32)}, r"unexpected \['W_skip'\]"),
      "unit_norm": ({"input_unit_norm": True}, None, "input_unit_norm=True .* not implemented"),
      "multi_topk": ({"multi_topk": True}, None, "multi_topk=True .*allow_training_only_options=True"),
      "no_d_in": ({"d_in": None}, None, "no 'd_in'"),
      # EleutherAI sparsify's other activation: one latent per group, not TopK.
      "groupmax": ({"activation": "groupmax"}, None, "activation 'groupmax' is not supported"),
  }
  for name, (cfg_over, tensors_over, pattern) in cases.items():
    folder = str(tmp_path / name)
    _numpy_folder(folder, cfg_over, tensors_over)
    with pytest.raises(sio.SparsifyFormatError, match=pattern):
      sio.load_sparsify(folder)

  # Training-only options load when allowed.
  params, cfg = sio.load_sparsify(str(tmp_path / "multi_topk"), allow_training_only_options=True)
  assert cfg["multi_topk"] is True
  np.testing.assert_array_equal(params["W_enc"], _random_params()["W_enc"])

  corrupt = tmp_path / "corrupt"
  _numpy_folder(str(corrupt))
  (corrupt / "sae.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(sio.SparsifyFormatError, match="cannot read as safetensors"):
    sio.load_sparsify(str(corrupt))


def test_activation_topk_loads_and_is_written(tmp_path):
  folder = str(tmp_path / "topk")
  _numpy_folder(folder, {"activation": "topk"})
  _, cfg = sio.load_sparsify(folder)
  assert cfg["activation"] == "topk"
  out = str(tmp_path / "out")
  sio.save_sparsify(_random_params(), {"k": K}, out)
  with open(os.path.join(out, "cfg.json")) as f:
    assert json.load(f)["activation"] == "topk"
