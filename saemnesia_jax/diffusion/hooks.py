"""Naming, capturing and editing the output of one UNet block.

Blocks are named as diffusers names them (``up_blocks.1.attentions.1``); the
Flax module path of that block is ``('up_blocks_1', 'attentions_1')``.

* Capture uses flax's ``capture_intermediates`` filtered to the one block, so
  nothing else is kept.
* Edit uses ``nn.intercept_methods`` around the UNet call: the block's
  ``__call__`` output ``x`` (B, H, W, C), channels last) is replaced by
  ``edit(x)``. The interceptor must be entered *inside* the jitted function
  (entered outside, the edit is baked into the compile cache).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import flax.linen as nn
import jax

from saemnesia_jax.runtime.errors import UserError

_BLOCK_RE = re.compile(r"^(down_blocks_\d+|up_blocks_\d+|mid_block)$")
_PART_RE = re.compile(r"^(attentions|resnets)_\d+$")


class UnknownBlockError(UserError, KeyError):
  def __str__(self):  # KeyError quotes its message; this one is prose
    return str(self.args[0])


def flax_path(block: str) -> tuple[str, ...]:
  """'up_blocks.1.attentions.1' -> ('up_blocks_1', 'attentions_1')."""
  parts = block.split(".")
  out, i = [], 0
  while i < len(parts):
    if i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  return tuple(out)


def diffusers_name(path: tuple[str, ...]) -> str:
  """('up_blocks_1', 'attentions_1') -> 'up_blocks.1.attentions.1'."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path)


def hookable_blocks(unet_params: dict) -> list[str]:
  """Diffusers names of every attention and resnet block of a UNet, in order."""
  names = []
  for top, sub in unet_params.items():
    if not _BLOCK_RE.match(top) or not hasattr(sub, "items"):
      continue
    for part in sub:
      if _PART_RE.match(part):
        names.append(diffusers_name((top, part)))

  def key(name):
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return (order[name.split(".")[0]], [int(x) if x.isdigit() else x for x in name.split(".")[1:]])
  return sorted(names, key=key)


def resolve_block(unet_params: dict, block: str) -> tuple[str, ...]:
  """Validates ``block`` against the UNet and returns its Flax path."""
  valid = hookable_blocks(unet_params)
  if block not in valid:
    raise UnknownBlockError(
        f"unknown block {block!r}; this UNet's hookable blocks are: {', '.join(valid)}")
  return flax_path(block)


def capture_filter(path: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
  """A ``capture_intermediates`` filter that keeps only ``path``'s output."""
  return lambda mdl, method: method == "__call__" and tuple(mdl.path) == path


def captured_value(intermediates: dict, path: tuple[str, ...]) -> jax.Array:
  node = intermediates
  for p in path:
    node = node[p]
  return node["__call__"][0]


def edit_interceptor(path: tuple[str, ...], edit: Callable[[jax.Array], jax.Array]):
  """An ``nn.intercept_methods`` interceptor applying ``edit`` to ``path``'s output."""

  def interceptor(next_fun, args, kwargs, context: Any):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and tuple(context.module.path) == path:
      out = edit(out)
    return out
  return interceptor
