"""One schema of the config fields: each field's type (and a tuple's element
type), its range, and that every number is finite.

Types come from the defaults (``runtime/config_defaults.py``: a field's type
is its default's, a tuple's element type its elements'); ``RANGES`` below
adds the range of each number and the element type of tuples whose default
is empty; ``EXTRA`` declares the fields of sections that only some config
files have (CanvasMini's build: data, classifier, base_train, base_eval).
``pipeline.sup_train.<field>`` follows ``train.<field>``.

``validate(config)`` raises ``ConfigError`` naming the first bad field; the
checks (``runtime/checks.py``) call it for every stage before any other
check, before any folder is made and before JAX loads. A number anywhere in
a config, declared or not, must be finite.

A range is written "[lo, hi]" with ( or ) for an open end and inf for none.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from saemnesia_jax.runtime import config_defaults, config_docs
from saemnesia_jax.runtime.errors import ConfigError

POS, NONNEG, NEG, FRAC, PROB, PCT = "(0, inf)", "[0, inf)", "(-inf, 0]", "[0, 1)", "[0, 1]", "(0, 100)"

# Ranges of numbers (of each element for a tuple); "int*" / "str*" / "float*"
# declares the element type of a tuple whose default is empty.
RANGES: dict[str, str] = {
    "prompts": "str*", "seeds": "int* " + NONNEG,
    "model.seed": NONNEG,
    "sampler.num_steps": POS, "sampler.guidance_scale": NONNEG, "sampler.height": NONNEG,
    "sampler.width": NONNEG, "sampler.batch_size": POS,
    "concepts.objects": "str*", "concepts.styles": "str*",
    "collect.seeds": NONNEG, "collect.seed_stride": NONNEG, "collect.prompts_per_object": NONNEG,
    "collect.process_index": "[-1, inf)", "collect.process_count": NONNEG, "collect.max_units": NONNEG,
    "sae.d_in": NONNEG, "sae.expansion_factor": POS, "sae.n_latents": NONNEG, "sae.k": POS,
    "sae.auxk_alpha": NONNEG, "sae.k_aux": NONNEG, "sae.dead_tokens": POS, "sae.w_sup": NONNEG,
    "sae.w_l1": NONNEG, "sae.w_decorr": NONNEG,
    "train.steps": POS, "train.epochs": NONNEG, "train.style_block_epochs": NONNEG, "train.batch_size": POS,
    "train.learning_rate": POS, "train.final_lr_fraction": PROB, "train.adam_eps": NONNEG,
    "train.grad_clip": NONNEG, "train.seed": NONNEG, "train.val_fraction": FRAC, "train.val_batches": POS,
    "train.eval_every": POS, "train.patience": POS, "train.min_delta": NONNEG, "train.log_every": POS,
    "train.ckpt_every": POS, "train.keep_checkpoints": POS, "train.stop_after": NONNEG,
    "train.micro_batches": POS, "train.buffer_chunks": POS, "train.init_tokens": POS,
    "scores.batch_size": POS, "scores.val_fraction": FRAC, "scores.split_seed": NONNEG,
    "scores.mass_fraction": "(0, 1]",
    "probe.steps": POS, "probe.batch_size": POS, "probe.learning_rate": POS, "probe.val_fraction": "(0, 1)",
    "probe.split_seed": NONNEG, "probe.seed": NONNEG,
    "evaluate.objects": "str*", "evaluate.styles": "str*", "evaluate.sequential_objects": "str*",
    "evaluate.grid_rows": "str*", "evaluate.variants": "str*",
    "evaluate.gammas": NEG, "evaluate.percentiles": PCT, "evaluate.num_steps": NONNEG,
    "evaluate.sweep_seeds": NONNEG, "evaluate.eval_seeds": NONNEG, "evaluate.rule_seeds": NONNEG,
    "evaluate.max_latents": POS,
    "evaluate.recognised_confidence": PROB, "evaluate.saemnesia_percentiles": PCT,
    "evaluate.jpeg_quality": "[-1, 100]",
    "attack.methods": "str*", "attack.objects": "str*", "attack.styles": "str*", "attack.prompts": POS,
    "attack.prefix_tokens": POS, "attack.steps": POS, "attack.learning_rate": POS, "attack.weight_decay": NONNEG,
    "attack.timesteps_per_step": POS, "attack.check_every": NONNEG, "attack.check_timesteps": POS,
    "attack.target_seeds": "int* " + NONNEG, "attack.seeds": "int* " + NONNEG, "attack.seed": NONNEG,
    "attack.stop_after": NONNEG,
    "unlearn.concepts": "str*", "unlearn.prompts": "str*", "unlearn.gamma": NEG,
    "unlearn.percentile": "[0, 100)", "unlearn.seeds": NONNEG, "unlearn.batch_size": NONNEG,
    "pipeline.quick_train_steps": POS, "pipeline.quick_concepts": POS, "pipeline.quick_gammas": NEG,
    "pipeline.quick_percentiles": PCT, "pipeline.quick_eval_seeds": NONNEG,
}

# Fields of sections only some configs have: "type range" (type: bool, int, float, str; a tuple's with *).
EXTRA: dict[str, str] = {
    "concepts.no_style": "str", "concepts.spaces_in_prompts": "bool",
    "data.image_size": "int " + POS, "data.objects": "str*", "data.styles": "str*", "data.no_style": "str",
    "data.position_jitter": "float " + NONNEG, "data.scale_jitter": "float " + FRAC,
    "data.rotation_jitter_deg": "float " + NONNEG, "data.train_seed": "int " + NONNEG,
    "data.eval_seed": "int " + NONNEG, "data.grid_seed": "int " + NONNEG,
    "classifier.aug_blur_max": "float " + NONNEG, "classifier.aug_brightness": "float " + NONNEG,
    "classifier.aug_noise_max": "float " + NONNEG, "classifier.batch_size": "int " + POS,
    "classifier.eval_blur": "float* " + NONNEG, "classifier.eval_noise": "float* " + NONNEG,
    "classifier.init_seed": "int " + NONNEG, "classifier.learning_rate": "float " + POS,
    "classifier.n_eval": "int " + POS, "classifier.n_train": "int " + POS,
    "classifier.no_object_share": "float " + FRAC, "classifier.steps": "int " + POS,
    "classifier.warmup_steps": "int " + NONNEG, "classifier.widths": "int* " + POS,
    "model.beta_start": "float (0, 1)", "model.beta_end": "float (0, 1)", "model.beta_schedule": "str",
    "model.block_out_channels": "int* " + POS, "model.down_block_types": "str*",
    "model.up_block_types": "str*", "model.layers_per_block": "int " + POS, "model.max_length": "int " + POS,
    "model.num_heads": "int " + POS, "model.pooled_text_conditioning": "bool", "model.prediction_type": "str",
    "model.text_heads": "int " + POS, "model.text_layers": "int " + POS, "model.text_width": "int " + POS,
    "model.time_id_dim": "int " + POS,
    "base_train.batch_size": "int " + POS, "base_train.ckpt_every": "int " + POS,
    "base_train.ema_decay": "float " + FRAC, "base_train.epsilon_steps": "int " + NONNEG,
    "base_train.eval_every": "int " + POS, "base_train.final_lr_fraction": "float " + PROB,
    "base_train.finetune_learning_rate": "float " + POS, "base_train.finetune_warmup_steps": "int " + NONNEG,
    "base_train.grad_clip": "float " + NONNEG, "base_train.learning_rate": "float " + POS,
    "base_train.log_every": "int " + POS, "base_train.prompt_dropout": "float " + FRAC,
    "base_train.seed": "int " + NONNEG, "base_train.steps": "int " + POS,
    "base_train.warmup_steps": "int " + NONNEG, "base_train.weight_decay": "float " + NONNEG,
    "base_eval.batch_size": "int " + POS, "base_eval.guidance_scales": "float* " + NONNEG,
    "base_eval.num_steps": "int " + POS, "base_eval.seeds": "int* " + NONNEG,
    "base_eval.train_seeds": "int* " + NONNEG, "build.export_dir": "str",
}

_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


@dataclasses.dataclass(frozen=True)
class Spec:
  """A field: its type, a tuple's element type (None: not checked), and the range of its numbers."""
  type: type
  elem: type | None = None
  lo: float = -math.inf
  hi: float = math.inf
  lo_open: bool = False
  hi_open: bool = False

  def range_text(self) -> str:
    return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

  def admits(self, v: float) -> bool:
    return ((v > self.lo) if self.lo_open else (v >= self.lo)) and ((v < self.hi) if self.hi_open else (v <= self.hi))


def _range(text: str) -> dict:
  lo, hi = (p.strip() for p in text.strip()[1:-1].split(","))
  return dict(lo=float(lo), hi=float(hi), lo_open=text.strip()[0] == "(", hi_open=text.strip()[-1] == ")")


def _elem_of(value: tuple) -> type | None:
  kinds = {type(x) for x in value}
  if kinds <= {int, float} and float in kinds:
    return float
  return kinds.pop() if len(kinds) == 1 and kinds <= {int, float, str, bool} else None


def _parse(decl: str, default: Any = None) -> Spec:
  """A Spec from a declaration ("int* [0, inf)", "(0, 1)") and the default's type."""
  decl = decl.strip()
  head, _, rest = decl.partition(" ") if decl[:1].isalpha() else ("", "", decl)
  rng = _range(rest) if rest.strip() else {}
  if head:
    base = _TYPES[head.rstrip("*")]
    return Spec(tuple, base, **rng) if head.endswith("*") else Spec(base, **rng)
  if isinstance(default, tuple):
    return Spec(tuple, _elem_of(default) if default else None, **rng)
  return Spec(type(default), **rng)


def _build() -> dict[str, Spec]:
  defaults = dict(config_defaults.TOP)
  for section, fields in {**config_defaults.SHARED, **config_defaults.SECTIONS}.items():
    defaults.update({f"{section}.{k}": v for k, v in fields.items() if not isinstance(v, dict)})
  out = {k: _parse(RANGES.get(k, ""), v) if k in RANGES else _parse("", v) for k, v in defaults.items()}
  out.update({k: _parse(v) for k, v in EXTRA.items()})
  out["evaluate.saeuron_style_setting"] = Spec(tuple, float)  # (percentile, gamma): checked below
  return out


SPECS: dict[str, Spec] = _build()


def spec_of(field: str) -> Spec | None:
  """The Spec of ``section.field`` (``pipeline.sup_train.<f>`` as ``train.<f>``)."""
  if field.startswith("pipeline.sup_train."):
    field = "train." + field[len("pipeline.sup_train."):]
  return SPECS.get(field)


def _fail(field: str, value: Any, why: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {why}")


def _number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite_everywhere(field: str, value: Any, whole: Any) -> None:
  if _number(value) and not math.isfinite(value):
    _fail(field, whole, "must be a finite number (not nan or inf)")
  if isinstance(value, (tuple, list)):
    for x in value:
      _finite_everywhere(field, x, whole)


def _is(value: Any, kind: type) -> bool:
  if kind is float:
    return _number(value)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def check_field(field: str, value: Any) -> None:
  """Raises ConfigError if ``value`` does not fit ``field``'s Spec (or is a non-finite number)."""
  _finite_everywhere(field, value, value)
  spec = spec_of(field)
  if spec is None:
    return
  name = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}
  if spec.type is tuple:
    if not isinstance(value, (tuple, list)):
      _fail(field, value, f"must be a tuple, e.g. \"({'1' if spec.elem in (int, float) else repr('a')},)\"")
    items = list(value)
  else:
    items = [value]
  kind = spec.elem if spec.type is tuple else spec.type
  for x in items:
    if kind is not None and not _is(x, kind):
      each = "each element " if spec.type is tuple else ""
      hint = "; a tuple that does not parse becomes a string: write e.g. \"(188, 288)\"" if (
          spec.type is tuple and isinstance(x, str)) else ""
      _fail(field, value, f"{each}must be {name[kind]}{hint}")
    if _number(x) and not spec.admits(x):
      words = {POS: "a positive number", NONNEG: ">= 0"}.get(spec.range_text().replace("inf]", "inf)"))
      _fail(field, value, f"{'each element ' if spec.type is tuple else ''}must be "
            + (words or f"in {spec.range_text()}"))


def validate(config: Any) -> None:
  """Checks every field of ``config`` against the schema (ConfigError naming the first bad one)."""
  flat = config_docs.flat_fields(config)
  for field, value in flat.items():
    check_field(field, value)
  setting = flat.get("evaluate.saeuron_style_setting")
  if setting is not None:
    if len(setting) != 2 or not 0 < setting[0] < 100 or setting[1] > 0:
      _fail("evaluate.saeuron_style_setting", setting, "must be (percentile in (0, 100), gamma <= 0)")


def fields() -> Mapping[str, Spec]:
  return SPECS
