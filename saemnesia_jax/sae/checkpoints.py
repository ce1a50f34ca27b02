"""The trainer's orbax checkpoints: the train state, the reader's position and
the run's accounting, saved together and restored onto the mesh; and the
metrics file cut back to the checkpoint a resumed run restarts from."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from saemnesia_jax.runtime.io_utils import atomic_write_bytes


def manager(path: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, reader_state: dict, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), reader=ocp.args.JsonSave(reader_state),
      meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, init_fn: Callable, shardings: Any, x_sample: Any):
  """(state, reader state, meta) of the latest checkpoint, placed as
  ``shardings`` says; None without a checkpoint."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.eval_shape(init_fn, x_sample)
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), reader=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return out["state"], out["reader"], out["meta"]


def keep_metrics_until(path: str, step: int) -> None:
  """Drops the metrics lines past ``step`` (logged after the checkpoint a
  resumed run restarts from), so that every step appears once."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  keep = [l for l in lines if json.loads(l).get("step", 0) <= step]
  if len(keep) != len(lines):
    atomic_write_bytes(path, "".join(keep).encode())
