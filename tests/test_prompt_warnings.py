"""Prompts the text encoder cannot read as written are named on stderr, once each:
longer than the tokenizer's length (cut) or with words outside a word-level
vocabulary (CanvasMini's and the tiny pipeline's: read as <unk>)."""
import numpy as np

from saemnesia_jax.canvas_mini import PIPELINE_DIR
from saemnesia_jax.diffusion import models
from saemnesia_jax.diffusion import tiny as tiny_lib


def test_the_tiny_tokenizer_names_cut_and_unknown_prompts_once(capfd):
  tok = tiny_lib.build_word_tokenizer(tiny_lib.DEFAULT_WORDS, 8)
  fine, unknown = "a cat image in neon style", "a zebra image in neon style"
  long = "a cat image in neon style with a dog and a bird"
  models.warn_changed_prompts(tok, [fine, unknown, long, unknown], 8)
  models.warn_changed_prompts(tok, [unknown], 8)  # said once per process
  err = capfd.readouterr().err.strip().splitlines()
  assert err == [f"warning: prompt {unknown!r}: 'zebra' not in the vocabulary, read as {tok.unk_token}",
                 f"warning: prompt {long!r}: 14 tokens, cut to the first 8"], err


def test_tokenize_warns_on_the_canvas_mini_pipeline(capfd):
  pipe = models.load_pipeline(PIPELINE_DIR)
  ids = pipe.tokenize(["A Disk image in Stripes style.", "A Hexagon image in Stripes style."])
  assert ids.shape == (2, pipe.max_length) and np.all(ids[0] != pipe.tokenizer.unk_token_id)
  err = capfd.readouterr().err
  assert "warning: prompt 'A Hexagon image in Stripes style.': 'Hexagon' not in the vocabulary" in err, err
  assert "Disk image" not in err
