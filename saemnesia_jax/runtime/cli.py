"""The command line of every stage: flags, help, checks and errors.

  python -m saemnesia_jax.<stage> --config configs/<name>.py [--config.<field>=<value> ...] [--debug]
  python -m saemnesia_jax.<stage> --help [--config configs/<name>.py]

Each stage module starts with ``if __name__ == "__main__": cli.main(...)``
*before* its own imports, so flags are parsed, ``--help`` printed and the
config checked (``runtime/checks.py``) before JAX or diffusers are imported: help is
instant and a bad value costs a second, not a model load.

Errors: the project's own (``errors.UserError``: a bad value, a missing or
mismatched file, a full disk) print as ``error: ...`` on stderr, at most three lines, and
exit with code 2. ``--debug`` (or ``SAEMNESIA_DEBUG=1``) shows their
traceback. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

import saemnesia_jax
from saemnesia_jax.runtime import checks, config_defaults, config_docs, io_utils
from saemnesia_jax.runtime.errors import ConfigError, UserError
from saemnesia_jax.runtime.registry import STAGES

ENV_DEBUG = "SAEMNESIA_DEBUG"
EXIT_USER_ERROR = 2


_HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def _err(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)


def _debug(argv: Sequence[str]) -> bool:
  return "--debug" in argv or os.environ.get(ENV_DEBUG, "") not in ("", "0")


# -------------------------------------------------------------------- help


def _docstring(module: str) -> str:
  spec = importlib.util.find_spec(module)
  with open(spec.origin) as f:
    return ast.get_docstring(ast.parse(f.read())) or ""


def _config_arg(argv: Sequence[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_file(path: str) -> Any:
  """``get_config()`` of a config file (as config_flags loads it)."""
  if not os.path.isfile(path):
    raise ConfigError(f"no config file {path}: give --config configs/<name>.py")
  try:
    spec = importlib.util.spec_from_file_location("_saemnesia_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"config file {path} has no get_config(): define one that returns an "
                        "ml_collections.ConfigDict (see configs/tiny.py)")
    config = module.get_config()
  except SyntaxError as e:
    raise ConfigError(f"config file {path}: syntax error at line {e.lineno}: {e.msg}; fix the file") from e
  except UserError:
    raise
  except Exception as e:  # the file's own code failed: its message, in one line (--debug for the traceback)
    msg = (str(e).strip().splitlines() or [""])[0]
    raise ConfigError(f"config file {path}: get_config() failed with {type(e).__name__}: {msg}; "
                      "fix the file (--debug shows where)") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config() returned a {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; wrap it: return ml_collections.ConfigDict(...)")
  return config


def _default_config() -> dict:
  """The documented defaults: config_defaults' sections and top-level fields."""
  out: dict[str, Any] = dict(config_defaults.TOP)
  out.update({name: dict(v) for name, v in config_defaults.SHARED.items()})
  out.update({name: dict(v) for name, v in config_defaults.SECTIONS.items()})
  return out


def help_text(stage: str, config_path: str | None = None) -> str:
  st = STAGES[stage]
  if config_path:
    config, where = load_config_file(config_path), f"values of {config_path}"
  else:
    config, where = _default_config(), "defaults; give --config to see a config's values"
  flat = config_docs.flat_fields(config)
  keys = config_docs.selected(flat, st.reads)
  docs = config_docs.field_docs(config_path or "")
  usage = (f"usage: python -m {st.module} --config configs/<name>.py "
           "[--config.<field>=<value> ...] [--debug]")
  return "\n".join([
      usage, "", _docstring(st.module), "",
      f"Config fields this stage reads ({where}):",
      config_docs.format_fields(flat, docs, keys), "",
      "--debug (or SAEMNESIA_DEBUG=1): show the traceback of an error.",
      "Fields are documented where their defaults are set (saemnesia_jax/runtime/config_defaults.py).",
  ])


# ------------------------------------------------------------------- flags


def _override_error(config_path: str, argv: Sequence[str], exc: Exception) -> str:
  """One line naming the bad override: its section, the field, the closest names."""
  try:
    config = load_config_file(config_path)
  except Exception:  # the config file itself is broken: absl's message says why
    return str(exc)
  for a in argv:
    if not a.startswith("--config."):
      continue
    path = a[len("--config."):].split("=", 1)[0].split(".")
    node, section = config, "config"
    for part in path:
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        close = difflib.get_close_matches(part, fields, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"its fields: {', '.join(sorted(fields))}"
        if not fields:
          return f"{section} is a value, not a section: {a.split('=', 1)[0]} does not exist"
        return f"{section} has no field {part!r}; {hint}"
      node, section = node[part], f"{section}.{part}"
  msg = str(exc).strip().splitlines()
  return msg[-1] if msg else type(exc).__name__


def parse(stage: str, argv: Sequence[str]) -> Any:
  """The config of ``argv`` (overrides applied, locked); raises ConfigError."""
  fv = flags.FLAGS  # the global flags, so that absl logging knows they are parsed
  if "config" not in fv:
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True)
  fv.unparse_flags()
  config_path = _config_arg(argv)
  if not config_path:
    raise ConfigError(f"no config given: python -m {STAGES[stage].module} --config configs/<name>.py")
  load_config_file(config_path)  # a broken file: one line naming it, not absl's message
  try:
    rest = fv(list(argv))
  except Exception as e:  # absl / ml_collections: an override of a missing field or a bad value
    raise ConfigError(_override_error(config_path, argv, e)) from e
  if len(rest) > 1:
    raise ConfigError(f"unexpected arguments {rest[1:]}; settings go in --config.<field>=<value>")
  return fv.config


# ------------------------------------------------------- XLA:CPU memory

# XLA:CPU runs bf16/fp16 matmuls and convolutions in fp32: each weight gets an
# fp32 copy. Its default scheduler makes all the copies at once, and the
# sampler's lax.scan hoists them out of the loop as invariants, so a bf16 SD
# v1.5 image held the UNet's weights twice over (4.3 GB extra). With these
# two flags each copy lives only around its own matmul. CPU only: GPU and TPU
# compute in bf16 natively and keep their defaults.
XLA_CPU_LOW_MEMORY_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
                            "--xla_disable_hlo_passes=while-loop-invariant-code-motion")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")


def cpu_only(environ: dict | None = None) -> bool:
  """Whether JAX will run on the CPU (read before JAX starts: no backend init).

  libtpu counts only where a TPU is attached (/dev/accel* or /dev/vfio/<n>):
  installed on a CPU host (``.[tpu]``, for ``--config.topology``) JAX still runs on the CPU."""
  platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return set(platforms.split(",")) == {"cpu"}
  return not any(importlib.util.find_spec(p) is not None and (p != "libtpu" or _tpu_attached())
                 for p in _ACCELERATOR_PLUGINS)


def _tpu_attached() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def compile_only_platform(config: Any, environ: dict | None = None) -> bool:
  """A dry run for a TPU slice (``config.topology``) compiles with libtpu on
  this host and runs nothing: JAX_PLATFORMS=cpu (unless set) keeps it off
  any local accelerator and quiet about the TPU it cannot find. Returns
  whether it set it. Before JAX initialises its backend."""
  environ = os.environ if environ is None else environ
  if not (config.get("dry_run") and config.get("topology")) or environ.get("JAX_PLATFORMS"):
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  return True


def set_xla_cpu_flags(config: Any, environ: dict | None = None) -> bool:
  """Adds XLA_CPU_LOW_MEMORY_FLAGS to XLA_FLAGS for a half-precision model on the CPU.

  Must run before JAX initialises its backend (XLA reads XLA_FLAGS once).
  Returns whether it added them. A flag the user already set is kept.
  """
  environ = os.environ if environ is None else environ
  model = config.get("model") if hasattr(config, "get") else None
  if model is None or str(model.get("dtype", "float32")) not in ("bfloat16", "float16") or not cpu_only(environ):
    return False
  flags = environ.get("XLA_FLAGS", "")
  extra = [f for f in XLA_CPU_LOW_MEMORY_FLAGS if f.split("=")[0] not in flags]
  if extra:
    environ["XLA_FLAGS"] = " ".join([flags] + extra).strip()
  return bool(extra)


# -------------------------------------------------------------------- main


def main(stage: str, argv: Sequence[str] | None = None) -> None:
  """Parses, checks and runs ``stage``; exits (0 done, 2 a user error)."""
  argv = list(sys.argv if argv is None else argv)
  debug = _debug(argv)
  argv = [a for a in argv if a not in ("--debug", "--nodebug")]
  if "--version" in argv[1:]:
    print(f"saemnesia_jax {saemnesia_jax.__version__}")
    sys.exit(0)
  if any(a in _HELP_FLAGS for a in argv[1:]):
    try:
      print(help_text(stage, _config_arg(argv)))
    except UserError as e:
      _err(str(e))
      sys.exit(EXIT_USER_ERROR)
    except BrokenPipeError:  # `--help | head`
      sys.stderr.close()
    sys.exit(0)
  try:
    config = parse(stage, argv)
    checks.check(stage, config)
    if not compile_only_platform(config) and not config.get("topology"):
      set_xla_cpu_flags(config)  # XLA_FLAGS reach every compiler: none of CPU's for a TPU slice's
    if cpu_only():
      # libtpu installed on a host without a TPU: JAX would still probe for one, printing errors.
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
      from saemnesia_jax.runtime import host_arrays  # deferred: ml_dtypes takes ~1 s; --help stays instant
      host_arrays.keep_freed_memory()  # XLA:CPU's per-call temporaries: no page faults every step
    module = importlib.import_module(STAGES[stage].module)
    try:
      module.run(config)
    except OSError as e:  # out of space in a write outside io_utils' atomic writer (a log, a checkpoint)
      if e.errno not in io_utils.DISK_FULL:
        raise
      raise io_utils.disk_full(e.filename or "a file", e) from e
  except UserError as e:
    if debug:
      raise
    lines = str(e).strip().splitlines() or [type(e).__name__]
    if len(lines) > 2:  # keep it short: what is wrong and how to fix it
      lines = lines[:1] + [" ".join(l.strip() for l in lines[1:])]
    _err("\n".join(lines))
    print(f"(--debug or {ENV_DEBUG}=1 shows the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to continue where it stopped", file=sys.stderr)
    sys.exit(130)
  sys.exit(0)
