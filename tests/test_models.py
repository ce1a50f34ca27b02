"""Model layer: loading diffusers-format directories (Flax and PyTorch weights)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from saemnesia_jax.diffusion import hooks
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib

torch = pytest.importorskip("torch")  # the PyTorch-weights tests need the [torch] extra

SPEC = tiny_lib.TinySpec()


@pytest.fixture(scope="module")
def flax_dir(tmp_path_factory):
  return tiny_lib.write_tiny_pipeline(str(tmp_path_factory.mktemp("m") / "flax"), SPEC, seed=3)


@pytest.fixture(scope="module")
def flax_pipe(flax_dir):
  return models.load_pipeline(flax_dir)


def _assert_params_equal(a, b):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_pytorch_weights_round_trip_equal_params(flax_dir, flax_pipe, tmp_path, fmt):
  unet, _, te, tok, vae, _, sched = tiny_lib.tiny_components(SPEC, seed=3)
  p = flax_pipe.params
  pt_dir = tiny_lib.save_pipeline(str(tmp_path / fmt), unet, p["unet"], te, p["text_encoder"], tok,
                                sched, vae, p["vae"], fmt=fmt)
  names = os.listdir(os.path.join(pt_dir, "unet"))
  assert not any(n.endswith(".msgpack") for n in names), names
  assert any(n.startswith("diffusion_pytorch_model") for n in names), names
  pt_pipe = models.load_pipeline(pt_dir)
  for part in ("unet", "text_encoder", "vae"):
    _assert_params_equal(pt_pipe.params[part], p[part])


def test_flax_round_trip_and_pytorch_forward_agree(flax_pipe, tmp_path):
  # Flax -> save -> load gives the same parameters ...
  unet, _, te, tok, vae, _, sched = tiny_lib.tiny_components(SPEC, seed=3)
  p = flax_pipe.params
  again = models.load_pipeline(tiny_lib.save_pipeline(
      str(tmp_path / "again"), unet, p["unet"], te, p["text_encoder"], tok, sched, vae, p["vae"]))
  for part in ("unet", "text_encoder", "vae"):
    _assert_params_equal(again.params[part], p[part])
  # ... and the PyTorch UNet made from those weights computes what Flax computes.
  from diffusers import UNet2DConditionModel
  from diffusers.models.modeling_pytorch_flax_utils import load_flax_checkpoint_in_pytorch_model
  unet_dir = os.path.join(flax_pipe.path, "unet")
  tunet = load_flax_checkpoint_in_pytorch_model(
      UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir)),
      os.path.join(unet_dir, models.UNET_FLAX_WEIGHTS)).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  ctx = rng.standard_normal((2, SPEC.max_length, SPEC.text_width)).astype(np.float32)
  with torch.no_grad():
    ref = tunet(torch.from_numpy(x), torch.tensor([10, 500]), torch.from_numpy(ctx)).sample.numpy()
  out = flax_pipe.unet_apply(p, jnp.asarray(x), jnp.array([10, 500]), jnp.asarray(ctx)).sample
  # float32 accumulation order differs between the two; a conversion error
  # (a missed transpose or renamed weight) gives differences of order 1.
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-3)
  assert np.abs(np.asarray(out) - ref).mean() < 1e-4


def test_tokenizer_pads_and_marks_eos(flax_pipe):
  ids = flax_pipe.tokenize(["A cat image in neon style.", ""])
  assert ids.shape == (2, SPEC.max_length) and ids.dtype == np.int32
  tok = flax_pipe.tokenizer
  assert ids[0, 0] == tok.bos_token_id and tok.unk_token_id not in ids[0]
  assert list(ids[1, :3]) == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
  # CLIP pools at the eos token: its id must be the tokenizer's real one.
  assert flax_pipe.text_encoder.config.eos_token_id == tok.eos_token_id


def test_bfloat16_load_casts_params(flax_dir, flax_pipe):
  pipe = models.load_pipeline(flax_dir, dtype="bfloat16")
  leaves = jax.tree_util.tree_leaves(pipe.params)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  # Read straight into bfloat16: the same values as a float32 load cast afterwards.
  _assert_params_equal(pipe.params, models.cast_params(flax_pipe.params, jnp.bfloat16))
  # The text-encoder wrapper keeps no (float32) weights of its own beside pipe.params.
  assert not pipe.text_encoder._is_initialized


def test_memory_efficient_attention_matches_plain(flax_dir, flax_pipe):
  assert not flax_pipe.unet.use_memory_efficient_attention  # 'auto' at a 16 x 16 latent: plain
  chunked = models.load_pipeline(flax_dir, attention="memory_efficient")
  assert chunked.unet.use_memory_efficient_attention
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 4, 16, 16)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, SPEC.max_length, SPEC.text_width)), jnp.float32)
  t = jnp.array([10, 500])
  a = flax_pipe.unet_apply(flax_pipe.params, x, t, ctx).sample
  b = chunked.unet_apply(chunked.params, x, t, ctx).sample
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    models.load_pipeline(flax_dir, attention="flash")


def test_hookable_blocks_follow_diffusers_names(flax_pipe):
  names = hooks.hookable_blocks(flax_pipe.params["unet"])
  assert "up_blocks.1.attentions.1" in names and "mid_block.attentions.0" in names
  assert hooks.flax_path("up_blocks.1.attentions.1") == ("up_blocks_1", "attentions_1")
  assert hooks.diffusers_name(("up_blocks_1", "attentions_1")) == "up_blocks.1.attentions.1"
  with pytest.raises(KeyError, match=r"up_blocks\.9\.attentions\.0.*hookable blocks are: .*up_blocks\.1\.attentions\.1"):
    hooks.resolve_block(flax_pipe.params["unet"], "up_blocks.9.attentions.0")


def test_errors_name_the_path_and_what_was_expected(flax_dir, tmp_path):
  with pytest.raises(models.ModelLoadError, match="does not exist"):
    models.load_pipeline(str(tmp_path / "nowhere"))
  (tmp_path / "partial" / "unet").mkdir(parents=True)
  with pytest.raises(models.ModelLoadError, match=r"missing folder 'text_encoder/'"):
    models.load_pipeline(str(tmp_path / "partial"))
  with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*bfloat16"):
    models.load_pipeline(flax_dir, dtype="fp8")
  import shutil
  broken = tmp_path / "broken"
  shutil.copytree(flax_dir, broken)
  os.remove(broken / "unet" / models.UNET_FLAX_WEIGHTS)
  with pytest.raises(models.ModelLoadError, match=r"no weights in .*unet.*diffusion_flax_model\.msgpack"):
    models.load_pipeline(str(broken))
  with pytest.raises(models.ModelLoadError, match="no weights"):
    models.load_pipeline(flax_dir, from_pt=True)
  # Weights that do not fit the config are refused, not silently re-initialised.
  wrong = tmp_path / "wrong"
  shutil.copytree(flax_dir, wrong)
  import json
  cfg = json.loads((wrong / "unet" / "config.json").read_text())
  cfg["block_out_channels"] = [32, 64, 96]
  (wrong / "unet" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises((models.ModelLoadError, ValueError), match="shape"):
    models.load_pipeline(str(wrong))
