"""The activation store: captured UNet block outputs on disk, and their reader.

SAE training reads the output of one UNet block captured at every denoising
step of every (prompt, seed). One captured step is a *map* of
(tokens_per_map, d_in) with integer labels. The store writes maps to disk from
many processes, resumably, and reads them back as shuffled batches. It is
three modules, all re-exported here (``store.open_store``,
``store.TokenBatches``, ...):

* ``store_format``: layout on disk, codecs, manifest, ``open_store``.
* ``store_units``: ``write_unit``/``UnitWriter``, completion markers,
  ``pending_units``, ``verify``, ``summary``.
* ``reader``: ``TokenBatches``, ``MapBatches`` (shuffled, prefetched,
  resumable), the train/validation ``split_hash``, ``to_global``.

Sizes: bytes per stored token = d_in x 2 (bf16) x the compression ratio, plus
4 x n_fields / tokens_per_map for labels (0.09 B at SD scale); see
``benchmarks/store.py``.

CLI: ``python -m saemnesia_jax.store summary PATH`` and
``python -m saemnesia_jax.store verify PATH [--repair]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from saemnesia_jax.runtime.errors import UserError

from saemnesia_jax.store.format import (COMPRESSIONS, DTYPES, FORMAT, LABEL_FIELDS, LABEL_FILL, REQUIRED_IDENTITY,
                                        VERSION, ManifestMismatchError, ShapeRecord, Store, StoreError, check_identity,
                                        default_maps_per_chunk, make_manifest, open_store)
from saemnesia_jax.store.reader import MapBatches, TokenBatches, split_hash, to_global
from saemnesia_jax.store.units import (UnitWriter, done_units, format_summary, pending_units, read_labels, read_unit,
                                       summary, unit_rows, verify, write_unit)

__all__ = [
    "COMPRESSIONS", "DTYPES", "FORMAT", "LABEL_FIELDS", "LABEL_FILL", "REQUIRED_IDENTITY", "VERSION",
    "ManifestMismatchError", "MapBatches", "ShapeRecord", "Store", "StoreError", "TokenBatches", "UnitWriter",
    "check_identity", "default_maps_per_chunk", "done_units", "format_summary", "main", "make_manifest",
    "open_store", "pending_units", "read_labels", "read_unit", "split_hash", "summary", "to_global",
    "unit_rows", "verify", "write_unit",
]

# --------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m saemnesia_jax.store", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p_sum = sub.add_parser("summary", help="counts per concept and per timestep")
  p_sum.add_argument("path")
  p_sum.add_argument("--json", action="store_true", help="print the summary as JSON")
  p_ver = sub.add_parser("verify", help="read every completed unit and check it against its marker")
  p_ver.add_argument("path")
  p_ver.add_argument("--repair", action="store_true", help="drop the markers of bad units")
  args = parser.parse_args(argv)
  try:
    return _main(args)
  except UserError as e:  # a damaged or missing store: one line, as every stage's command line does
    if os.environ.get("SAEMNESIA_DEBUG", "") not in ("", "0"):
      raise
    lines = str(e).strip().splitlines()
    print("error: " + " ".join(l.strip() for l in lines), file=sys.stderr)
    return 2


def _main(args) -> int:
  if args.cmd == "summary":
    s = summary(open_store(args.path))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0
  store = open_store(args.path)
  report = verify(store, repair=args.repair)
  print(f"checked {report['checked']} units, {len(report['bad'])} bad")
  for u, why in sorted(report["bad"].items()):
    print(f"  unit {u}: {why}")
  if report["repaired"]:
    print(f"removed {len(report['repaired'])} markers; run the collection again to rewrite those units")
  return 1 if report["bad"] and not args.repair else 0

