"""The jitted DDIM + CFG sampler, block capture and block edit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib
from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec, sample_prompts

STEPS, B = 4, 2
BLOCK = "up_blocks.1.attentions.1"
PROMPTS = ["A cat image in neon style.", "A dog image in pastel style."]


def affine_edit(p, x, step):
  """x * scale + shift from the given step on: identity for (1, 0)."""
  on = step >= p["from_step"]
  return jnp.where(on, x * p["scale"] + p["shift"], x)


IDENTITY = {"scale": jnp.float32(1.0), "shift": jnp.float32(0.0), "from_step": jnp.int32(0)}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return models.load_pipeline(tiny_lib.write_tiny_pipeline(str(tmp_path_factory.mktemp("p") / "tiny"), seed=1))


@pytest.fixture(scope="module")
def ids(pipe):
  return pipe.tokenize(PROMPTS), pipe.tokenize([""] * B)


@pytest.fixture(scope="module")
def plain(pipe):
  return Sampler(pipe, SamplerSpec(num_steps=STEPS, batch_size=B))


@pytest.fixture(scope="module")
def capture_edit(pipe):
  return Sampler(pipe, SamplerSpec(num_steps=STEPS, batch_size=B, capture_block=BLOCK, edit_block=BLOCK),
                 edit_fn=affine_edit)


SEEDS = np.array([188, 288], np.uint32)


@pytest.fixture(scope="module")
def plain_out(plain, pipe, ids):
  return plain(pipe.params, ids[0], ids[1], SEEDS, np.float32(9.0))


def test_matches_diffusers_flax_pipeline(pipe, plain, ids, plain_out):
  from diffusers import FlaxStableDiffusionPipeline
  ref_pipe = FlaxStableDiffusionPipeline(
      vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
      scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None)
  params = dict(pipe.params, scheduler=pipe.scheduler.create_state())
  ref = ref_pipe._generate(jnp.asarray(ids[0]), params, jax.random.PRNGKey(0), STEPS, 32, 32, 9.0,
                           latents=plain.initial_latents(SEEDS), neg_prompt_ids=jnp.asarray(ids[1]))
  assert plain_out.images.shape == (B, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(plain_out.images), np.asarray(ref), atol=5e-5)
  assert float(jnp.std(plain_out.images)) > 1e-3  # not a constant image


def test_identity_edit_and_capture(pipe, capture_edit, ids, plain_out):
  out = capture_edit(pipe.params, ids[0], ids[1], SEEDS, np.float32(9.0), IDENTITY)
  np.testing.assert_allclose(np.asarray(out.images), np.asarray(plain_out.images), atol=1e-6)
  # (steps, B, H, W, C) with the block's channel count.
  assert out.captured.shape == (STEPS, B, 8, 8, 64)
  assert capture_edit.block_output_shape() == (8, 8, 64)
  # A real edit changes the images; capture sees the edited block output.
  doubled = dict(IDENTITY, scale=jnp.float32(2.0))
  out2 = capture_edit(pipe.params, ids[0], ids[1], SEEDS, np.float32(9.0), doubled)
  assert float(jnp.abs(out2.images - out.images).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(out2.captured[0]), 2 * np.asarray(out.captured[0]), rtol=1e-5, atol=1e-5)
  # The step argument gates the edit: from the last step on, the first steps' captures agree.
  late = dict(doubled, from_step=jnp.int32(STEPS - 1))
  out3 = capture_edit(pipe.params, ids[0], ids[1], SEEDS, np.float32(9.0), late)
  np.testing.assert_allclose(np.asarray(out3.captured[:-1]), np.asarray(out.captured[:-1]), atol=1e-6)
  assert float(jnp.abs(out3.captured[-1] - out.captured[-1]).max()) > 1e-3


def test_changing_prompts_seeds_scale_and_edit_does_not_retrace(pipe, capture_edit, ids):
  jax.block_until_ready(capture_edit(pipe.params, ids[0], ids[1], SEEDS, np.float32(9.0), IDENTITY))
  before = capture_edit.n_traces
  assert before == 1
  other = pipe.tokenize(["A red bird image in dots style.", "A boat."])
  for cond, seeds, scale, edit in [
      (other, np.array([1, 2], np.uint32), 3.0, IDENTITY),
      (ids[0], np.array([5, 6], np.uint32), 7.5, dict(IDENTITY, shift=jnp.float32(0.3))),
  ]:
    jax.block_until_ready(capture_edit(pipe.params, cond, ids[1], seeds, np.float32(scale), edit))
  assert capture_edit.n_traces == before


def test_each_image_depends_only_on_its_seed(pipe, plain, ids, plain_out):
  # Swapping the batch order swaps the images: nothing couples batch rows.
  out = plain(pipe.params, ids[0][::-1], ids[1], SEEDS[::-1], np.float32(9.0))
  np.testing.assert_allclose(np.asarray(out.images[::-1]), np.asarray(plain_out.images), atol=1e-5)


def test_sample_prompts_pads_the_last_batch(pipe, plain, plain_out):
  got = sample_prompts(plain, PROMPTS + PROMPTS[:1], [188, 288, 188], 9.0, progress=False)
  assert got.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(got[:2], np.asarray(plain_out.images), atol=1e-5)
  np.testing.assert_allclose(got[2], got[0], atol=1e-5)
  assert plain.n_traces == 1
  with pytest.raises(ValueError, match="one seed per prompt"):
    sample_prompts(plain, PROMPTS, [1], 9.0)


def test_unknown_blocks_and_bad_specs_are_errors(pipe):
  with pytest.raises(KeyError, match=r"hookable blocks are: .*up_blocks\.1\.attentions\.1"):
    Sampler(pipe, SamplerSpec(num_steps=2, capture_block="up_blocks.7.attentions.0"))
  with pytest.raises(ValueError, match="without an edit_fn"):
    Sampler(pipe, SamplerSpec(num_steps=2, edit_block=BLOCK))
  with pytest.raises(ValueError, match="multiples of 2"):
    Sampler(pipe, SamplerSpec(num_steps=2, height=33, width=32))
