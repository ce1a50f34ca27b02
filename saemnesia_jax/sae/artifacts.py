"""The files the train and scores stages write, read back: an exported SAE
(sparsify's layout + ``saemnesia.json``), its score tables (``scores.npz``,
complete once ``manifest.json`` is written) and the concept -> latent
assignment (``assignment.json``). Stages and the API read them through here."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from saemnesia_jax import store as store_lib
from saemnesia_jax.runtime.errors import UserError
from saemnesia_jax.runtime.io_utils import read_json
from saemnesia_jax.sae import sparsify_io

FORMAT = "saemnesia_jax.scores"
VERSION = 1
META_FILE = "saemnesia.json"
SCORES_FILE = "scores.npz"
ASSIGNMENT_FILE = "assignment.json"
REPORT_FILE = "report.json"
PLOT_FILE = "report.png"
MANIFEST_FILE = "manifest.json"


class ScoresError(UserError):
  """The SAE, the store or the settings of the scores stage do not fit together."""


def load_sae(sae_dir: str, field: str = "scores.sae_dir"
             ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any] | None]:
  """(params float32, sparsify cfg, saemnesia.json or None) of an exported SAE
  folder; ``field``: the config field that names it (said in an error)."""
  try:
    params, cfg = sparsify_io.load_sparsify(sae_dir, dtype=np.float32, allow_training_only_options=True)
  except sparsify_io.SparsifyFormatError as e:
    where = field if field.startswith("the ") else f"--config.{field}"
    raise ScoresError(f"cannot load the SAE at {sae_dir}: {e} Train one first "
                      f"(python -m saemnesia_jax.train) or set {where}.") from e
  meta_path = os.path.join(sae_dir, META_FILE)
  meta = read_json(meta_path) if os.path.isfile(meta_path) else None
  if meta is not None and meta.get("mode") not in ("unsupervised", "supervised"):
    raise ScoresError(f"{meta_path}: mode must be 'unsupervised' or 'supervised', got {meta.get('mode')!r}")
  return params, cfg, meta


def check_sae_fits_store(sae_dir: str, cfg: Mapping[str, Any], meta: Mapping[str, Any] | None,
                         store: store_lib.Store) -> None:
  """Refuses an SAE trained on other activations than ``store`` holds.

  Checks d_in always; block and model weights hash when saemnesia.json
  records the identity of the store the SAE was trained on.
  """
  fix = ("Point --config.scores.sae_dir at an SAE trained on this store, or --config.collect.store_path "
         "at the store this SAE was trained on.")
  if int(cfg["d_in"]) != store.d_in:
    raise ScoresError(f"the SAE at {sae_dir} has d_in={cfg['d_in']}, but the activation store at "
                      f"{store.path} holds d_in={store.d_in} channels per token. {fix}")
  trained_on = (meta or {}).get("store_identity")
  if not trained_on:
    return
  here = store.manifest["identity"]
  lines = [f"  {key}: SAE trained on {trained_on.get(key)!r}, store has {here.get(key)!r}"
           for key in ("block", "weights_sha256") if trained_on.get(key) != here.get(key)]
  if lines:
    raise ScoresError(f"the SAE at {sae_dir} was trained on activations of another model or block than "
                      f"the store at {store.path} holds:\n" + "\n".join(lines) + f"\n{fix}")


def load_scores(out_dir: str) -> dict[str, np.ndarray]:
  """The arrays of scores.npz in ``out_dir`` (see the module docstring), after checking
  that the folder is complete (manifest.json is written last)."""
  if not os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):
    raise ScoresError(f"{out_dir} holds no complete scores (manifest.json missing): run "
                      "`python -m saemnesia_jax.scores --config ...` first")
  with np.load(os.path.join(out_dir, SCORES_FILE)) as f:
    return {key: f[key] for key in f.files}


def load_assignment(path: str, objects: Sequence[str] | None = None,
                    styles: Sequence[str] | None = None) -> np.ndarray:
  """The concept -> latent assignment (int32, objects then styles) from assignment.json
  (or the scores folder holding it); with names given, they must match."""
  if os.path.isdir(path):
    path = os.path.join(path, ASSIGNMENT_FILE)
  a = read_json(path)
  for key, names in (("objects", objects), ("styles", styles)):
    if names is not None and a[f"{key[:-1]}_names"] != list(names):
      raise ScoresError(f"{path} assigns latents to {key} {a[f'{key[:-1]}_names']}, but the caller has "
                        f"{list(names)}: compute the scores on the store of these concepts")
  # The name -> latent maps are the record; the JSON writer sorts their keys, so order comes from the lists.
  ids = [a["objects"][n] for n in a["object_names"]] + [a["styles"][n] for n in a["style_names"]]
  if ids != a["latents"]:
    raise ScoresError(f"{path} is inconsistent: its name -> latent maps give {ids}, its latents list "
                      f"{a['latents']}; run the scores stage again")
  return np.asarray(ids, np.int32)
