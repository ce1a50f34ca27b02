"""The collectives of a compiled program, from its HLO text (``compiled.as_text()``).

``collectives(text)`` counts, by kind, the all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute instructions one call of
the program executes, and their bytes per device (the size of each
collective's result; for an asynchronous ``-start`` the last element of its
tuple, the ``-done`` not counted again). An instruction inside a ``while``
body counts its known trip count times (XLA's ``known_trip_count``, e.g. a
``lax.scan`` over micro-batches or sampler steps); both branches of a
conditional count once (an upper bound). JAX-free: plain text.
"""
from __future__ import annotations

import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_COMP = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_WHILE = re.compile(r"\swhile\(.*?body=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _bytes(shape: str, start: bool) -> int:
  arrays = _ARRAY.findall(shape)
  if start and shape.lstrip().startswith("(") and len(arrays) > 1:
    arrays = arrays[-1:]  # an async start's (operand, result) tuple: the result
  total = 0
  for dtype, dims in arrays:
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * DTYPE_BYTES[dtype]
  return total


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  comps, entry, name = {}, "", None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      name = m.group(2)
      comps[name] = []
      entry = name if m.group(1) else entry
    elif name is not None:
      if line.strip() == "}":
        name = None
      else:
        comps[name].append(line)
  return comps, entry


def collectives(text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count': executions per call, 'bytes': bytes per device per call}} for every kind."""
  comps, entry = _computations(text)
  out = {k: {"count": 0, "bytes": 0} for k in KINDS}

  def visit(name: str, times: int, depth: int = 0) -> None:
    if name not in comps or depth > 64:
      return
    for line in comps[name]:
      m = _INSTR.match(line)
      if m:
        out[m.group(2)]["count"] += times
        out[m.group(2)]["bytes"] += times * _bytes(m.group(1), bool(m.group(3)))
        continue
      w = _WHILE.search(line)
      if w:
        trip = _TRIP.search(line)
        visit(w.group(1), times * (int(trip.group(1)) if trip else 1), depth + 1)
        continue
      for callee in _CALLS.findall(line):
        visit(callee, times, depth + 1)
      for group in _BRANCHES.findall(line):
        for callee in re.findall(r"%([\w.\-]+)", group):
          visit(callee, times, depth + 1)

  visit(entry, 1)
  return out


def summary(stats: dict[str, dict[str, int]]) -> str:
  """'3 all-reduce (1.2 MiB), 1 all-gather (256 KiB)' or 'none'."""
  parts = [f"{v['count']} {k} ({size(v['bytes'])})" for k, v in stats.items() if v["count"]]
  return ", ".join(parts) or "none"


def size(n: float) -> str:
  """Bytes in GiB, MiB, KiB or B."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"
