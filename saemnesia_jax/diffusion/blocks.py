"""A block per domain: objects at ``config.block``, styles at ``config.style_block``.

SAeUron erases objects at ``up_blocks.1.attentions.1`` and styles at
``up_blocks.1.attentions.2``, each with its own SAE. A config that names a
``style_block`` other than ``block`` runs collect, train and scores once per
block, each in its own folder ``{workdir}/{block}/`` (store, SAE runs,
scores), and the evaluation clamps objects with the object block's SAE and
styles with the style block's. ``style_block = ''`` (or equal to ``block``)
is one block for both, with the folders directly in ``workdir`` as before.

Explicit paths of the per-block stages must then name the block with the
placeholder ``{block}`` (e.g. ``--config.collect.store_path=/data/acts/{block}``),
else both blocks would share one store or SAE.
"""
from __future__ import annotations

import copy
import os

import ml_collections

# Path fields of the per-block stages (section, field); '' means "the default under workdir".
PATH_FIELDS = (("collect", "store_path"), ("sae", "init_from"), ("sae", "scores_dir"), ("scores", "sae_dir"),
               ("scores", "out_dir"), ("probe", "out_dir"), ("evaluate", "saeuron_sae"),
               ("evaluate", "saeuron_scores"), ("evaluate", "saemnesia_sae"), ("evaluate", "saemnesia_scores"))
PLACEHOLDER = "{block}"


def domain_blocks(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{'object': block, 'style': style block} of ``config``."""
  block = config.get("block", "")  # the scores stage runs without one
  return {"object": block, "style": config.get("style_block", "") or block}


def blocks(config: ml_collections.ConfigDict) -> list[str]:
  """The distinct hooked blocks, the object block first."""
  return list(dict.fromkeys(domain_blocks(config).values()))


def per_block(config: ml_collections.ConfigDict) -> bool:
  return len(blocks(config)) > 1


def block_config(config: ml_collections.ConfigDict, block: str) -> ml_collections.ConfigDict:
  """The config of one block's stages: ``block`` hooked for both domains and,
  with two blocks, ``workdir`` = ``{workdir}/{block}`` and ``{block}`` filled
  into the explicit paths. With one block, ``config`` itself."""
  names = blocks(config)
  if block not in names:
    raise ValueError(f"{block!r} is not a block of this config (config.block / config.style_block: {names})")
  if len(names) == 1:
    return config
  out = copy.deepcopy(config)
  present = [(sec, f) for sec, f in PATH_FIELDS if out.get(sec, None) is not None and f in out[sec]]
  before = {k: out[k[0]][k[1]] for k in present}
  out.workdir = os.path.join(config.workdir, block)  # paths made from workdir references follow it
  out.block = block
  out.style_block = block
  for section, field in present:
    path = out[section][field]
    if not path or path != before[(section, field)]:
      continue  # '' (the default under workdir) or derived from workdir
    if PLACEHOLDER not in path:
      raise ValueError(f"config.{section}.{field}={path!r} names no {PLACEHOLDER}, but config.block and "
                       f"config.style_block differ ({names}): each block needs its own; put {PLACEHOLDER} "
                       "in the path, or leave it '' for the default under workdir")
    out[section][field] = path.replace(PLACEHOLDER, block)
  if out.get("train", None) is not None and block != config.block:
    epochs = float(out.train.get("style_block_epochs", 0.0))
    if epochs > 0:
      out.train.epochs = epochs
  return out
