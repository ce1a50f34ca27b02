"""The documentation of config fields, read from the comments that define them.

A field is documented once, by the comment at the end of the line that gives
its default, in ``runtime/config_defaults.py`` for the shared stage sections:

  SAE = dict(
      k=32,  # active latents per token

or in a config file for the fields it defines itself:

  config.model = ml_collections.ConfigDict(dict(
      dtype="float32",  # float32 | bfloat16 | float16
  config.block = "up_blocks.1.attentions.1"  # the hooked block

``field_docs(path)`` parses such a file (with ``ast``, nothing is executed)
into ``{"sae.k": "active latents per token", ...}``; ``--help`` of every
stage prints these next to the values. No JAX is imported here: help must be
fast.
"""
from __future__ import annotations

import ast
import io
import os
import tokenize
from typing import Any, Iterable, Mapping

DEFAULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_defaults.py")


def _comments(source: str) -> dict[int, str]:
  """Line number -> the text of a comment on that line."""
  out = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = tok.string.lstrip("#").strip()
  return out


def _section_of(target: ast.expr) -> str | None:
  """``config.model`` -> 'model'; ``SAE`` (a module-level defaults dict) -> 'sae'."""
  if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "config":
    return target.attr
  if isinstance(target, ast.Name) and target.id.isupper():
    return target.id.lower()
  return None


def _dict_call(node: ast.expr) -> ast.Call | None:
  """The ``dict(...)`` call of ``dict(...)`` or ``ConfigDict(dict(...))``."""
  if isinstance(node, ast.Call):
    name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
    if name == "dict":
      return node
    if name == "ConfigDict" and node.args:
      return _dict_call(node.args[0])
  return None


def parse_docs(source: str) -> dict[str, str]:
  """``{"section.field" or "field": comment}`` of one config source file."""
  comments = _comments(source)
  docs: dict[str, str] = {}
  aliases: dict[str, str] = {}  # ``data = config.data = ConfigDict()``: data -> 'data'
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign):
      continue
    sections = [s for s in map(_section_of, node.targets) if s]
    for t in node.targets:
      if isinstance(t, ast.Name) and sections:
        aliases[t.id] = sections[0]
    t = node.targets[-1]
    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in aliases
        and node.end_lineno in comments):  # ``data.image_size = 16  # comment``
      docs[f"{aliases[t.value.id]}.{t.attr}"] = comments[node.end_lineno]
    if not sections:
      continue
    section = "" if sections[0] == "top" else sections[0] + "."
    call = _dict_call(node.value)
    if call is None:
      # ``config.block = "..."  # comment``: a top-level field.
      if isinstance(t, ast.Attribute) and node.end_lineno in comments:
        docs[sections[0]] = comments[node.end_lineno]
      continue
    ends = [kw.value.end_lineno for kw in call.keywords]
    for kw in call.keywords:
      # A comment documents a field only when that field alone ends its line.
      line = kw.value.end_lineno
      if kw.arg is not None and line in comments and ends.count(line) == 1:
        docs[section + kw.arg] = comments[line]
  return docs


def field_docs(*paths: str) -> dict[str, str]:
  """The docs of runtime/config_defaults.py, then of each file in ``paths`` (added to the defaults')."""
  docs: dict[str, str] = {}
  for p in (DEFAULTS_FILE, *paths):
    if p and os.path.isfile(p):
      with open(p) as f:
        for k, doc in parse_docs(f.read()).items():
          # A config file's own comment adds to the default's meaning.
          docs[k] = doc if k not in docs or doc == docs[k] else f"{docs[k]}; here: {doc}"
  return docs


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
  for k, v in d.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def flat_fields(config: Any) -> dict[str, Any]:
  """A config (ConfigDict or dict) as ``{"section.field": value}``."""
  d = config.to_dict() if hasattr(config, "to_dict") else config
  return dict(_flatten(d))


def selected(flat: Mapping[str, Any], reads: Iterable[str]) -> list[str]:
  """The fields of ``flat`` under any of ``reads`` (sections like 'sae' or fields like 'block')."""
  reads = list(reads)
  return [k for k in flat if any(k == r or k.startswith(r + ".") for r in reads)]


def format_fields(flat: Mapping[str, Any], docs: Mapping[str, str], keys: Iterable[str]) -> str:
  """One line per field: ``name = value   meaning``."""
  keys = list(keys)
  rows = [(k, repr(flat[k]), docs.get(k, "")) for k in keys]
  w1 = max((len(k) for k, _, _ in rows), default=0)
  w2 = min(max((len(v) for _, v, _ in rows), default=0), 28)
  lines = []
  for k, v, doc in rows:
    if len(v) > w2:
      lines.append(f"  {k:<{w1}} = {v}")
      if doc:
        lines.append(f"  {'':<{w1}}   {'':<{w2}}  {doc}")
    else:
      lines.append(f"  {k:<{w1}} = {v:<{w2}}  {doc}".rstrip())
  return "\n".join(lines)
