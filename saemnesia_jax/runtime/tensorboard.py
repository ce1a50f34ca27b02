"""Training curves for TensorBoard, without TensorFlow.

``ScalarWriter`` writes scalar summaries to an event file
(``events.out.tfevents.*``) that TensorBoard reads. It uses only the
``tensorboard`` package's protocol buffers (``tensorboard.compat.proto``) and
its record framing (``RecordWriter``), writing through a plain Python file:
not ``EventFileWriter``, which reaches the file system through
``tensorboard.compat.tf`` and so imports TensorFlow wherever it is installed.
Local paths only (no ``gs://``).

    with ScalarWriter(os.path.join(out_dir, "tensorboard"), enabled=jax.process_index() == 0) as tb:
      for step in ...:
        tb.scalars(step, metrics, prefix="train/")

Then ``tensorboard --logdir <out_dir>/tensorboard``.
"""
from __future__ import annotations

import itertools
import math
import numbers
import os
import socket
import time
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

_file_ids = itertools.count()  # two writers of one process in one second get two files


def as_scalar(value: Any) -> float | None:
  """``value`` as a finite float, or None where it is no finite real number:
  strings, None, NaN, +-inf, complex numbers, arrays of more than one element
  (a 0-d NumPy or JAX array is a number; reading a JAX one waits for it)."""
  if value is None or isinstance(value, (str, bytes)):
    return None
  if isinstance(value, (numbers.Real, np.bool_)):
    x = float(value)
  elif getattr(value, "shape", None) == () and hasattr(value, "dtype"):
    if np.dtype(value.dtype).kind not in "biufV":  # "V": bfloat16 and the other ml_dtypes
      return None
    try:
      x = float(value)
    except (TypeError, ValueError):
      return None
  else:
    return None
  return x if math.isfinite(x) else None


class ScalarWriter:
  """Writes scalars to one new event file in ``logdir``; with ``enabled=False``
  (every process but 0 in a multi-host run) it creates nothing and every
  method does nothing. Each ``scalars`` call is flushed to the file at once,
  so TensorBoard shows a running job's curves.

  A resumed run passes ``purge_from``, the first step it will log (the
  checkpoint's step + 1): the file then opens with a SessionLog START event
  at that step, by which TensorBoard drops what earlier files in ``logdir``
  logged at that step or later (the steps trained again after the
  checkpoint), as ``sae.checkpoints.keep_metrics_until`` does for metrics.jsonl."""

  def __init__(self, logdir: str, enabled: bool = True, purge_from: int | None = None):
    self.logdir = os.path.abspath(logdir)
    self.enabled = bool(enabled)
    self.path: str | None = None
    self._writer: RecordWriter | None = None
    if not self.enabled:
      return
    os.makedirs(self.logdir, exist_ok=True)
    now = time.time()
    # TensorBoard reads a folder's files in name order: the time first.
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids):04d}"
    self.path = os.path.join(self.logdir, name)
    self._writer = RecordWriter(open(self.path, "xb"))
    self._write(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))
    if purge_from is not None:
      self._write(event_pb2.Event(wall_time=now, step=int(purge_from),
                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _write(self, event: event_pb2.Event) -> None:
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> int:
    """Writes each finite real number of ``values`` under the tag ``prefix + key``
    at ``step``; other values (strings, None, NaN, inf, arrays) are skipped.
    Returns how many were written (0 when disabled or closed)."""
    if self._writer is None:
      return 0
    kept = [(prefix + str(k), x) for k, v in values.items() if (x := as_scalar(v)) is not None]
    if not kept:
      return 0
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=x) for t, x in kept])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    return len(kept)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Closes the file; later calls of any method do nothing."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
