"""TPU slices by their Cloud names, compiled for from any host (``--config.topology``).

  pip install -e '.[tpu]'     # libtpu: the TPU compiler (about 680 MB)
  python -m saemnesia_jax.train --config configs/sd15.py --config.dry_run=True --config.topology=v5p-8

``devices(name)`` returns the devices of the named slice as the TPU compiler
describes them (``jax.experimental.topologies``): compile-only devices, no
TPU needed. A mesh over them (``runtime/sharding.make_mesh``, the run's own
``train.mesh_shape``) and inputs as ``jax.ShapeDtypeStruct`` with a
``NamedSharding`` let ``jax.jit(f).lower(...).compile()`` run the real TPU
compiler on this host: its memory and cost analyses are the TPU's.

Names, as Cloud TPU names slices (``<generation>-<n>``):

* v4 and v5p count TensorCores, two per chip: v5p-8 is 4 chips (2x2x1),
  v4-32 is 16 chips (2x2x4). Each chip is one JAX device (megacore).
* v5e and v6e count chips (one TensorCore each): v5e-8 is 8 chips (2x4).

JAX-free: the checks validate a name before JAX loads; the compiler is
imported by ``devices`` only.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from saemnesia_jax.runtime.errors import ConfigError, UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip, vendor figures (Google Cloud's TPU system-architecture pages)."""
  generation: str  # the prefix of slice names: v4, v5e, v5p, v6e
  device_kind: str  # what JAX reports as ``device.device_kind``
  hbm_bytes: int  # HBM per chip, bytes (the vendor's GiB x 2**30; the runtime keeps a little)
  peak_bf16_flops: float  # dense bf16 matmul peak per chip, FLOP/s
  hbm_bytes_per_s: float  # HBM bandwidth per chip, bytes/s (the vendor's GB/s x 1e9)
  cores_per_name_unit: int  # TensorCores a name's count stands for per chip: 2 (v4, v5p) or 1
  chip_config: str = ""  # libtpu's chip_config_name ('megacore': one device per chip, as v4 runs)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9, 2, "megacore"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 1),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 2),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 1),
}

# Cloud name -> the chips' physical topology (libtpu's "<generation>:<topology>").
SLICES = {
    "v4-8": "2x2x1", "v4-16": "2x2x2", "v4-32": "2x2x4", "v4-64": "2x4x4", "v4-128": "4x4x4",
    "v5p-8": "2x2x1", "v5p-16": "2x2x2", "v5p-32": "2x2x4", "v5p-64": "2x4x4", "v5p-128": "4x4x4",
    "v5e-1": "1x1", "v5e-4": "2x2", "v5e-8": "2x4", "v5e-16": "4x4", "v5e-32": "4x8", "v5e-64": "8x8",
    "v6e-1": "1x1", "v6e-4": "2x2", "v6e-8": "2x4", "v6e-16": "4x4", "v6e-32": "4x8", "v6e-64": "8x8",
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # the Cloud name, e.g. v5p-8
  chip: Chip
  topology: str  # e.g. 2x2x1

  @property
  def chips(self) -> int:
    n = 1
    for d in self.topology.split("x"):
      n *= int(d)
    return n

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.generation}:{self.topology}"


def resolve(name: str) -> Slice:
  """The slice of a Cloud name (``v5p-8``); a ConfigError naming the known ones."""
  if name not in SLICES:
    raise ConfigError(f"config.topology={name!r}: not a known TPU slice; known: {', '.join(SLICES)} "
                      "(v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips)")
  return Slice(name, CHIPS[name.split("-")[0]], SLICES[name])


def chip_of(device_kind: str) -> Chip | None:
  """The chip whose ``device_kind`` this is (None: not a TPU of the table)."""
  return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def devices(name: str) -> list:
  """The compile-only devices of slice ``name``, in the order a run on it lists them."""
  sl = resolve(name)
  if not libtpu_installed():
    raise UserError(f"config.topology={name!r} compiles with the TPU compiler, libtpu, which is not "
                    "installed: pip install -e '.[tpu]' (jax[tpu] at the installed jax's version)")
  # libtpu takes a lockfile (/tmp/libtpu_lockfile) against a second process
  # driving the same TPU; compile-only devices drive none, and without this a
  # dry run beside another process that loaded libtpu (a test, a second dry
  # run) fails with "Internal error when accessing libtpu multi-process lockfile".
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # deferred: JAX is not loaded by the checks that import this module
  kw = {"chip_config_name": sl.chip.chip_config} if sl.chip.chip_config else {}
  desc = topologies.get_topology_desc(platform="tpu", topology_name=sl.libtpu_name, **kw)
  devs = list(desc.devices)
  if len(devs) != sl.chips:
    raise RuntimeError(f"libtpu describes {sl.libtpu_name} with {len(devs)} devices, expected {sl.chips} chips")
  return devs
