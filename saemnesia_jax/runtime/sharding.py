"""Sharding declared as rules in the config, applied with jax.sharding.

A rule is ``(regex, partition)``: the first regex that fully matches a
parameter's path ('W_enc', 'b_dec', ...; nested paths joined by '/') gives its
partition, a tuple of mesh-axis names or None per array axis. For the SAE the
latent axis goes on 'model', tokens on 'data'::

  sharding_rules = (("W_enc", (None, "model")), ("b_enc", ("model",)),
                    ("W_dec", ("model", None)), (".*", ()))   # () = replicated
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(shape: Sequence[int], axes: Sequence[str] = ("data", "model"),
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over ``devices`` (default all); one entry of ``shape`` may be -1 (the rest).

  A shape without -1 that needs fewer devices than there are uses the first
  ones (e.g. (1, 1) for a single-device reference run).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} axes but names {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if -1 not in shape and int(np.prod(shape)) < len(devices):
    devices = devices[:int(np.prod(shape))]  # an explicit smaller mesh: the first devices
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{len(devices)} are present; use -1 for one axis to fill the rest")
  return Mesh(np.array(devices).reshape(shape), tuple(axes))


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def spec_for(name: str, rules: Sequence[tuple[str, Sequence[str | None]]]) -> P:
  for pattern, partition in rules:
    if re.fullmatch(pattern, name):
      return P(*partition)
  raise ValueError(f"no sharding rule matches parameter {name!r}; rules: {[r[0] for r in rules]}. "
                   "End the rules with ('.*', ()) to replicate the rest.")


def tree_specs(tree: Any, rules) -> Any:
  """PartitionSpec per leaf of ``tree`` from the rules (matched on leaf paths)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: spec_for(_path_str(p), rules), tree)


def tree_shardings(mesh: Mesh, tree: Any, rules) -> Any:
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), tree_specs(tree, rules),
                                is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """Leading (batch) axis over ``data_axis``, the rest replicated."""
  return NamedSharding(mesh, P(data_axis))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
