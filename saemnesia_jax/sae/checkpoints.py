"""The trainer's orbax checkpoints: the train state, the reader's position and
the run's accounting, saved together and restored onto the mesh; and the
metrics file cut back to the checkpoint a resumed run restarts from."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from saemnesia_jax.runtime.io_utils import atomic_write_bytes, write_point


def manager(path: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, reader_state: dict, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), reader=ocp.args.JsonSave(reader_state),
      meta=ocp.args.JsonSave(meta)))
  write_point()  # the test hook may kill the process while orbax writes in the background


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


def keep_metrics_until(path: str, step: int, write: bool = True) -> bool:
  """Drops the metrics lines past ``step`` (logged after the checkpoint a
  rerun restarts from; 0 for a run killed before its first checkpoint) and a
  line torn by a kill while it was written, so that every step appears once.
  Returns whether the file held any line (TensorBoard then purges too)."""
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  keep = []
  for line in lines:
    try:
      rec = json.loads(line)
    except ValueError:  # torn: the process died writing it
      continue
    if rec.get("step", 0) <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if keep != lines and write:
    atomic_write_bytes(path, "".join(keep).encode())
  return bool(lines)
