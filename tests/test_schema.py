"""The config schema: every numeric field of every shipped config refuses NaN,
inf, a wrong type and an out-of-range value, naming the field, before any
work (checks.check, in-process); every JSON the project writes is strict."""
import json
import math
import os
import sys

import ml_collections
import numpy as np
import pytest

from saemnesia_jax.runtime import checks, config_defaults, config_docs, io_utils, schema
from saemnesia_jax.runtime.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
CONFIGS = ("canvas_mini", "canvas_mini_sup", "sd15", "sd15_sup", "tiny")


def _load(name):
  return __import__(name).get_config()


def _with(config, field, value):
  """A copy of ``config`` with ``field`` set to ``value`` (no ConfigDict type
  check: the schema is what must refuse it)."""
  d = config.to_dict()
  node = d
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  return ml_collections.ConfigDict(d)


def _out_of_range(spec, integer):
  if math.isfinite(spec.lo):
    v = spec.lo if spec.lo_open else spec.lo - 1
  elif math.isfinite(spec.hi):
    v = spec.hi if spec.hi_open else spec.hi + 1
  else:
    return None
  return int(v) if integer else float(v)


def _cases(config):
  """(field, bad value, what) for each numeric (or bool) field of ``config``."""
  for field, value in config_docs.flat_fields(config).items():
    spec = schema.spec_of(field)
    is_tuple = isinstance(value, tuple)
    kind = (spec.elem if spec and is_tuple else spec.type if spec else None)
    numeric = kind in (int, float)
    wrap = (lambda x: (x,)) if is_tuple else (lambda x: x)
    if kind is bool:
      yield field, "yes", "wrong type"
    if not numeric:
      continue
    yield field, wrap(float("nan")), "nan"
    yield field, wrap(float("inf")), "inf"
    yield field, wrap("x"), "wrong type"
    if kind is int:
      yield field, wrap(1.5), "wrong type"
    bad = _out_of_range(spec, kind is int)
    if bad is not None:
      yield field, wrap(bad), "out of range"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_numeric_field_refuses_nan_inf_wrong_types_and_out_of_range(name, tmp_path):
  config = _load(name)
  config.workdir = str(tmp_path / "w")
  checked, missed = 0, []
  for field, bad, what in _cases(config):
    try:
      checks.check("report", _with(config, field, bad))
    except ConfigError as e:
      if f"config.{field}=" not in str(e):
        missed.append((field, bad, what, f"named another field: {e}"))
    else:
      missed.append((field, bad, what, "accepted"))
    checked += 1
  assert not missed, missed[:20]
  assert checked > 100, checked
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_the_schema(name):
  config = _load(name)
  schema.validate(config)
  schema.validate(config_defaults.quick_of(config))


def test_every_numeric_default_has_a_range():
  """A new number in config_defaults needs its range in schema.RANGES."""
  missing = [k for k, s in schema.fields().items()
             if (s.type in (int, float) or s.elem in (int, float)) and math.isinf(s.lo) and math.isinf(s.hi)
             and k not in ("train.mesh_shape", "evaluate.saeuron_style_setting")]
  assert not missing


@pytest.mark.parametrize("field,value,match", [
    ("evaluate.gammas", ("(nan,)",), r"config\.evaluate\.gammas=\('\(nan,\)',\): each element must be a number"),
    ("unlearn.seeds", ("188x",), r"config\.unlearn\.seeds=\('188x',\): each element must be an integer"),
    ("evaluate.gammas", (5.0,), r"config\.evaluate\.gammas=\(5\.0,\): each element must be in \(-inf, 0\]"),
    ("unlearn.percentile", 150.0, r"config\.unlearn\.percentile=150\.0: must be in \[0, 100\)"),
    ("unlearn.batch_size", -1, r"config\.unlearn\.batch_size=-1: must be >= 0"),
    ("sampler.guidance_scale", float("inf"), r"config\.sampler\.guidance_scale=inf: must be a finite number"),
    ("train.learning_rate", float("nan"), r"config\.train\.learning_rate=nan: must be a finite number"),
    ("unlearn.gamma", float("nan"), r"config\.unlearn\.gamma=nan: must be a finite number"),
    ("pipeline.sup_train.learning_rate", -1.0, r"config\.pipeline\.sup_train\.learning_rate=-1\.0"),
    ("evaluate.saeuron_style_setting", (150.0, -1.0), r"saeuron_style_setting"),
])
def test_the_issues_values_are_refused(field, value, match):
  config = _load("canvas_mini")
  with pytest.raises(ConfigError, match=match):
    checks.check("unlearn", _with(config, field, value))


def test_json_writers_refuse_nan(tmp_path):
  path = str(tmp_path / "x.json")
  for bad in ({"loss": float("nan")}, {"a": [1.0, float("inf")]}, {"v": np.float32("nan")},
              {"v": np.array([1.0, np.nan])}):
    with pytest.raises(ValueError, match="not a finite number|Out of range"):
      io_utils.atomic_write_json(path, bad)
    assert not os.path.exists(path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
  io_utils.atomic_write_json(path, {"v": np.float32(1.5), "t": (1, 2)})
  assert json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) == {
      "t": [1, 2], "v": 1.5}


def test_the_store_manifest_has_the_usual_file_mode(tmp_path):
  """manifest.json is written through a temp file (mkstemp: 0600): it must
  read like the store's other files (0666 less the umask)."""
  from synthetic import make_concept_store
  make_concept_store(tmp_path / "acts", seeds=1)
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "acts" / "manifest.json").st_mode & 0o777 == 0o666 & ~umask
