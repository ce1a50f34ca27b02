"""Throughput of the activation store against the raw disk, and its size.

Run (SD-scale maps, about 4 minutes on a 2-core machine):

  python benchmarks/store.py --maps 400 --tokens 256 --d_in 1280 --maps_per_unit 50
  python benchmarks/store.py --maps 4000 --tokens 64 --d_in 64 --maps_per_unit 25   # miniature
  python benchmarks/store.py --maps 2000 --collect_units 0 --compression none,blosc-lz4 --rounds 9 \
      --json_out benchmarks/results/store_reader.json   # the reader against the raw read

(At 200 maps an epoch is 3 buffers, and the first buffer's read, which
nothing can overlap, is a third of it; 2,000 maps, 1.3 GB, come closer to
the steady state a training epoch of terabytes runs in, and the rate after
the first batch is printed too.)

Prints, for each compression: write throughput (``write_unit``: cast, NaN
check, sha256, tensorstore write, marker) and read throughput (one
``TokenBatches`` epoch, batches of ``--batch`` tokens as float32, shuffled) in
MB/s of stored (uncompressed bf16) bytes and tokens/s, next to a plain
sequential write (fsync) and read of a file of that size. The reader is
compared with a raw sequential read of the same bytes: the store's own
``acts`` files (compressed, as on disk) read in file order with ``readinto``
into one reused buffer, in the same run, rounds interleaved (raw, shuffled
reader, raw, ...). Before every read of either side the page cache of the
files read is dropped (posix_fadvise DONTNEED), so both read from the disk
where the kernel honours it (``fincore`` showed no page left resident here;
a virtual disk may still be cached by its host). The
ratio is raw time / reader time for the same content (the reader's tokens/s
over the raw read's): 1.0 means the shuffled reader delivers float32 batches
as fast as the disk delivers the bytes. Also the reader's CPU time (all
threads) per GB of stored bytes: the cost a host pays, whatever its core count,
and from it the free cores the reader needs to keep up with the raw read.
Then the bytes per stored token and the projected size of the SD v1.5
UnlearnCanvas collection. With ``--step_ms`` it also runs an epoch with a
simulated trainer step (a sleep per batch) and prints how long the trainer
waits for the reader per batch, with and without the background prefetch.

The data are synthetic (Gaussian, per-channel scales log-normal): the
compression ratio of real activations differs; pass ``--store PATH`` to
measure the read throughput and the bytes per token of a real store instead.

Last, the collection's overhead over sampling without capture
(``collection_overhead``: the tiny SD-like pipeline, or ``--collect_model``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from saemnesia_jax import store as st

# SD v1.5 UnlearnCanvas collection, as sized in issue 4: prompts x steps x tokens.
SD_PROMPTS, SD_STEPS, SD_TOKENS, SD_D_IN = 83_200, 50, 256, 1280


def _drop_cache(path: str) -> None:
  files = [path] if os.path.isfile(path) else [
      os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  for p in files:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _synthetic_unit(rng: np.random.Generator, n: int, tokens: int, d_in: int, scales: np.ndarray) -> np.ndarray:
  return (rng.standard_normal((n, tokens, d_in), np.float32) * scales).astype(np.float32)


def _labels(rows: np.ndarray, steps: int) -> dict[str, np.ndarray]:
  traj = rows // steps
  return {"object": traj % 20, "style": traj % 51 - 1, "timestep": 999 - 20 * (rows % steps),
          "step": rows % steps, "prompt": traj, "seed": np.zeros_like(rows)}


def raw_disk(path: str, nbytes: int, piece: int = 64 << 20) -> dict:
  """Sequential write (then fsync) and read of ``nbytes`` in one plain file."""
  buf = np.random.default_rng(0).integers(0, 255, (min(piece, nbytes),), np.uint8).tobytes()
  t = time.perf_counter()
  with open(path, "wb") as f:
    left = nbytes
    while left:
      k = min(left, len(buf))
      f.write(buf[:k])
      left -= k
    f.flush()
    os.fsync(f.fileno())
  tw = time.perf_counter() - t
  tr = raw_read([path])["s"]
  os.unlink(path)
  return {"write_MBps": nbytes / tw / 1e6, "read_MBps": nbytes / tr / 1e6}


def raw_read(files: list[str], piece: int = 16 << 20) -> dict:
  """Sequential read of ``files`` (cache dropped first) into one reused buffer."""
  for p in files:
    _drop_cache(p)
  buf = bytearray(piece)
  n = 0
  t = time.perf_counter()
  for p in files:
    with open(p, "rb", buffering=0) as f:
      while k := f.readinto(buf):
        n += k
  dt = time.perf_counter() - t
  return {"s": dt, "bytes": n, "file_MBps": n / dt / 1e6}


def _files(path: str) -> list[str]:
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def bench_read(store: st.Store, batch: int, prefetch: bool, step_s: float = 0.0, dtype=np.float32) -> dict:
  """One epoch of TokenBatches. ``step_s``: a simulated trainer step per batch
  (a sleep: the host thread idles while an accelerator computes)."""
  reader = st.TokenBatches(store, batch, split="all", process_index=0, process_count=1, prefetch=prefetch,
                           require_complete=False, num_epochs=1, dtype=dtype)
  nb = reader.batches_per_epoch()
  _drop_cache(os.path.join(store.path, "acts"))
  t, c = time.perf_counter(), time.process_time()
  first = None
  for _ in range(nb):
    next(reader)
    first = first or time.perf_counter() - t
    if step_s:
      time.sleep(step_s)
  dt, cpu = time.perf_counter() - t, time.process_time() - c
  tokens = nb * batch
  stored = tokens * store.d_in * store.dtype.itemsize
  return {"s": dt, "tokens": tokens, "read_MBps": stored / dt / 1e6, "read_tokens_per_s": tokens / dt,
          "cpu_s_per_GB": cpu / stored * 1e9, "stall_ms_per_batch": (dt - nb * step_s) / nb * 1e3,
          "first_batch_ms": first * 1e3,
          # after the first batch: an upper bound on the rate a long epoch runs
          # at (the buffers read ahead during the first batch's wait count for
          # the batches after it); the ratio over the epoch is the fair one
          "steady_tokens_per_s": (nb - 1) * batch / (dt - first) if nb > 1 else tokens / dt}


def compare_reads(store: st.Store, args: argparse.Namespace) -> dict:
  """Raw sequential reads of the store's acts files and shuffled reader epochs
  (float32, and the store dtype), rounds interleaved; medians and each round."""
  files, rounds = _files(os.path.join(store.path, "acts")), []
  n_tokens = int(st.read_labels(store)[1].sum()) * store.tokens_per_map
  for _ in range(args.rounds):
    raw = raw_read(files)
    f32 = bench_read(store, args.batch, prefetch=True)
    half = bench_read(store, args.batch, prefetch=True, dtype=None)
    raw_tps = n_tokens / raw["s"]
    content_GBps = raw_tps * store.d_in * store.dtype.itemsize / 1e9
    cores = os.cpu_count() or 1
    rounds.append({"cores_to_match_raw": f32["cpu_s_per_GB"] * content_GBps,"raw_file_MBps": raw["file_MBps"], "raw_tokens_per_s": raw_tps,
                   # the highest ratio this host's cores allow at the reader's CPU cost
                   "cpu_cap": cores / (f32["cpu_s_per_GB"] * content_GBps),
                   "store_dtype_cpu_cap": cores / (half["cpu_s_per_GB"] * content_GBps),
                   "first_batch_ms": f32["first_batch_ms"],
                   **{k: f32[k] for k in ("read_MBps", "read_tokens_per_s", "cpu_s_per_GB")},
                   "shuffled_over_raw": f32["read_tokens_per_s"] / raw_tps,
                   "store_dtype_read_MBps": half["read_MBps"], "store_dtype_cpu_s_per_GB": half["cpu_s_per_GB"],
                   "store_dtype_shuffled_over_raw": half["read_tokens_per_s"] / raw_tps,
                   "steady_over_raw": f32["steady_tokens_per_s"] / raw_tps,
                   "store_dtype_steady_over_raw": half["steady_tokens_per_s"] / raw_tps})
  out = {k: float(np.median([x[k] for x in rounds])) for k in rounds[0]}
  out["rounds"] = rounds
  return out


def _print_compare(r: dict, rounds: int) -> None:
  print(f"  {'':16s} raw sequential read of its files {r['raw_file_MBps']:.0f} MB/s of file bytes "
        f"({r['raw_tokens_per_s']:,.0f} tokens/s); shuffled float32 / raw {r['shuffled_over_raw']:.2f} "
        f"(rounds: " + ", ".join(f"{x['shuffled_over_raw']:.2f}" for x in r["rounds"]) + "); "
        f"shuffled store dtype: {r['store_dtype_read_MBps']:.0f} MB/s, "
        f"{r['store_dtype_cpu_s_per_GB']:.2f} CPU s/GB, / raw {r['store_dtype_shuffled_over_raw']:.2f} "
        f"(medians of {rounds} rounds); the float32 reader needs {r['cores_to_match_raw']:.1f} free cores "
        f"to match the raw read (its CPU s/GB x the raw read's GB/s of content): with {os.cpu_count()} cores "
        f"the ratio cannot pass {r['cpu_cap']:.2f} (store dtype {r['store_dtype_cpu_cap']:.2f}); "
        f"first batch after {r['first_batch_ms']:.0f} ms (the first buffer's read, not overlapped); "
        f"after it, shuffled / raw {r['steady_over_raw']:.2f} (float32), {r['store_dtype_steady_over_raw']:.2f} "
        f"(store dtype, what the trainer reads; an upper bound: the read-ahead buffers read while the first "
        f"batch waited count for the rest)")


def bench_store(workdir: str, args: argparse.Namespace, compression: str) -> dict:
  path = os.path.join(workdir, f"store-{compression}")
  shutil.rmtree(path, ignore_errors=True)
  manifest = st.make_manifest(
      model_dir="(synthetic)", weights_sha256="0" * 64, block="(synthetic)", scheduler={"name": "ddim"},
      num_steps=args.maps_per_unit, guidance_scale=9.0, prompt_grid={}, n_maps=args.maps,
      tokens_per_map=args.tokens, d_in=args.d_in, maps_per_unit=args.maps_per_unit,
      maps_per_chunk=args.maps_per_chunk, compression=compression)
  store = st.open_store(path, manifest, create=True)
  rng = np.random.default_rng(0)
  scales = np.exp(rng.normal(0.0, 1.0, (args.d_in,))).astype(np.float32)
  # A few distinct units, reused: generating data is not what is timed.
  pool = [_synthetic_unit(rng, args.maps_per_unit, args.tokens, args.d_in, scales) for _ in range(3)]
  t_write = 0.0
  for u in range(store.n_units):
    r0, r1 = st.unit_rows(store, u)
    x, lab = pool[u % len(pool)][:r1 - r0], _labels(np.arange(r0, r1), args.maps_per_unit)
    t = time.perf_counter()
    st.write_unit(store, u, x, lab)
    t_write += time.perf_counter() - t
  stored = args.maps * args.tokens * args.d_in * store.dtype.itemsize
  on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
  out = {
      "compression": compression, "maps_per_chunk": store.maps_per_chunk,
      "write_MBps": stored / t_write / 1e6, "write_tokens_per_s": args.maps * args.tokens / t_write,
      "ratio": on_disk / stored, "bytes_per_token": on_disk / (args.maps * args.tokens),
  }
  out.update(compare_reads(store, args))
  out["read_noprefetch_MBps"] = bench_read(store, args.batch, prefetch=False)["read_MBps"]
  if args.step_ms:
    for pf in (True, False):
      out[f"stall_ms_per_batch_prefetch_{pf}"] = bench_read(
          store, args.batch, prefetch=pf, step_s=args.step_ms / 1e3)["stall_ms_per_batch"]
  if not args.keep:
    shutil.rmtree(path)
  return out


def collection_overhead(args: argparse.Namespace) -> dict | None:
  """Collection (capture + store write, as ``collect.write_units`` runs it)
  against plain sampling of the same trajectories, side by side.

  Uses the tiny SD-like pipeline (configs/tiny.py) or ``--collect_model``;
  each round times one plain-sampling pass and one collection pass over the
  same units into a fresh store.
  """
  if args.collect_units <= 0:
    return None
  import sys
  import jax
  from saemnesia_jax import collect
  from saemnesia_jax.diffusion import models
  from saemnesia_jax.diffusion import tiny as tiny_lib
  from saemnesia_jax.diffusion.sampler import Sampler, SamplerSpec
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import tiny  # noqa: E402
  root = tempfile.mkdtemp(dir=args.workdir)
  config = tiny.get_config()
  config.workdir = root
  config.model.path = args.collect_model or tiny_lib.write_tiny_pipeline(os.path.join(root, "tiny"))
  config.sampler.num_steps = args.collect_steps
  config.sampler.batch_size = 4
  from saemnesia_jax.evaluation import concepts
  n_prompts = len(concepts.prompt_grid(config.concepts))
  config.collect.seeds = tuple(range(max(1, args.collect_units * 4 // n_prompts)))
  plain_t, collect_t = [], []
  config.collect.store_path = os.path.join(root, "acts0")
  col = collect.prepare(config)  # one model, one capturing sampler for every round
  plain = Sampler(col.pipe, SamplerSpec(num_steps=args.collect_steps, batch_size=4))
  collect.write_units(col, [0])  # compiles the capturing sampler
  p, s, _ = collect.unit_batch(col, 0)
  jax.block_until_ready(plain(col.pipe.params, col.cond_ids[p], col.uncond_ids, s, np.float32(9)))
  for r in range(args.collect_rounds):
    if r:  # a fresh store per round, same manifest
      col = col._replace(store=st.open_store(os.path.join(root, f"acts{r}"), col.store.manifest, create=True))
    units = list(range(1 if r == 0 else 0, col.store.n_units))
    t = time.perf_counter()
    for u in units:
      p, s, _ = collect.unit_batch(col, u)
      np.asarray(plain(col.pipe.params, col.cond_ids[p], col.uncond_ids, s, np.float32(9)).images)
    plain_t.append((time.perf_counter() - t) / len(units))
    t = time.perf_counter()
    collect.write_units(col, units)
    collect_t.append((time.perf_counter() - t) / len(units))
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  sp, sc = float(np.median(plain_t)), float(np.median(collect_t))
  return {"model": args.collect_model or "tiny", "steps": args.collect_steps, "batch": 4,
          "sampling_s_per_unit": sp, "with_store_s_per_unit": sc, "ratio": sc / sp,
          "overhead_pct": 100 * (sc / sp - 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None, help="folder for the stores (default: a temp folder)")
  parser.add_argument("--maps", type=int, default=400)
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--d_in", type=int, default=1280)
  parser.add_argument("--maps_per_unit", type=int, default=50)
  parser.add_argument("--maps_per_chunk", type=int, default=None)
  parser.add_argument("--batch", type=int, default=4096, help="tokens per read batch")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of raw and shuffled reads")
  parser.add_argument("--step_ms", type=float, default=20.0,
                      help="simulated trainer step per batch for the stall measurement (0: skip)")
  parser.add_argument("--compression", default="blosc-lz4,none,blosc-zstd")
  parser.add_argument("--store", default=None, help="measure reading an existing store instead")
  parser.add_argument("--keep", action="store_true")
  parser.add_argument("--json_out", default=os.path.join(os.path.dirname(__file__), "results", "store.json"))
  parser.add_argument("--collect_units", type=int, default=6,
                      help="units per round of the collection-overhead measurement (0: skip it)")
  parser.add_argument("--collect_steps", type=int, default=20)
  parser.add_argument("--collect_rounds", type=int, default=3)
  parser.add_argument("--collect_model", default=None, help="pipeline dir (default: tiny random)")
  args = parser.parse_args()

  results: dict = {"args": vars(args), "loadavg_start": open("/proc/loadavg").read().split()[:3]}
  if args.store:
    store = st.open_store(args.store)
    s = st.summary(store)
    results["store"] = r = {**compare_reads(store, args), "bytes_per_token": s["bytes_per_token"]}
    print(f"store {args.store}: read {r['read_MBps']:.0f} MB/s ({r['read_tokens_per_s']:,.0f} tokens/s; "
          f"{r['cpu_s_per_GB']:.2f} CPU s/GB), {s['bytes_per_token']:.1f} B/token")
    _print_compare(r, args.rounds)
    bpt = s["bytes_per_token"] * SD_D_IN / store.d_in
  else:
    workdir = args.workdir or tempfile.mkdtemp(prefix="store-bench-", dir=os.environ.get("TMPDIR", "/tmp"))
    os.makedirs(workdir, exist_ok=True)
    stored = args.maps * args.tokens * args.d_in * 2
    print(f"{args.maps} maps x {args.tokens} tokens x {args.d_in} channels, bfloat16: {stored / 1e6:.0f} MB; "
          f"units of {args.maps_per_unit} maps; batches of {args.batch} tokens")
    results["raw"] = raw = raw_disk(os.path.join(workdir, "raw.bin"), stored)
    print(f"  raw file         write {raw['write_MBps']:7.0f} MB/s   read {raw['read_MBps']:7.0f} MB/s")
    results["stores"] = []
    for comp in args.compression.split(","):
      r = bench_store(workdir, args, comp)
      results["stores"].append(r)
      print(f"  store {comp:10s} write {r['write_MBps']:7.0f} MB/s ({r['write_tokens_per_s']:,.0f} tokens/s)   "
            f"read {r['read_MBps']:7.0f} MB/s ({r['read_tokens_per_s']:,.0f} tokens/s; "
            f"{r['read_noprefetch_MBps']:.0f} MB/s without prefetch; {r['cpu_s_per_GB']:.2f} CPU s/GB)   "
            f"size x{r['ratio']:.3f}, {r['bytes_per_token']:.1f} B/token, chunks of {r['maps_per_chunk']} maps")
      _print_compare(r, args.rounds)
      if args.step_ms:
        print(f"  {'':16s} with a {args.step_ms:.0f} ms trainer step the reader stalls the trainer "
              f"{r['stall_ms_per_batch_prefetch_True']:.1f} ms/batch with prefetch, "
              f"{r['stall_ms_per_batch_prefetch_False']:.1f} ms/batch without")
    if not args.keep and not args.workdir:
      shutil.rmtree(workdir)
    bpt = results["stores"][0]["bytes_per_token"] * SD_D_IN / args.d_in
  total = SD_PROMPTS * SD_STEPS * SD_TOKENS
  results["sd_projection"] = {"tokens": total, "bytes_per_token": bpt, "bytes": total * bpt}
  print(f"projected SD v1.5 UnlearnCanvas collection ({SD_PROMPTS:,} prompts x {SD_STEPS} steps x {SD_TOKENS} "
        f"tokens, d_in {SD_D_IN}): {total:,} tokens x {bpt:.1f} B = {total * bpt / 1e12:.2f} TB "
        f"(uncompressed bf16: {total * SD_D_IN * 2 / 1e12:.2f} TB)")
  overhead = collection_overhead(args)
  results["collection_overhead"] = overhead
  print("collection overhead vs sampling: " + (json.dumps(overhead) if overhead else
                                               "not measured (hook collection_overhead, filled in with the sampler)"))
  results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
  print(f"load average at start {' '.join(results['loadavg_start'])}, at end {' '.join(results['loadavg_end'])}")
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
