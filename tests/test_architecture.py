"""The house rules, checked from the source: the import graph (imports inside
functions included) has no cycle, no library imports a stage, stages do not
import each other, deferred imports say so, diffusers and transformers are
imported by one module, modules stay under 500 lines, and docs/architecture.md
lists every module."""
import ast
import os
import re

import pytest

from saemnesia_jax.runtime import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "saemnesia_jax"
STAGES = {st.module for st in registry.STAGES.values() if st.module.count(".") == 1}  # top-level stage modules
HF_MODULE = "saemnesia_jax.diffusion.models"  # the one module that imports diffusers / transformers


def _modules() -> dict[str, str]:
  out = {}
  for base, _, files in os.walk(os.path.join(ROOT, PKG)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(base, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


MODULES = _modules()


def _imports(name: str, path: str):
  """(imported module or package name, ast node, inside a function) for every import of ``path``."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  in_fn = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(f)}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      targets = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for t in targets:
      yield t, node, id(node) in in_fn


def _graph() -> dict[str, set[str]]:
  edges = {m: set() for m in MODULES}
  for m, path in MODULES.items():
    for t, _, _ in _imports(m, path):
      while t and t not in MODULES:  # a name inside a module -> the module
        t = t.rsplit(".", 1)[0] if "." in t else ""
      if t and t != m and not m.startswith(t + "."):  # a package's own __init__ is not an edge
        edges[m].add(t)
  return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in edges:
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_libraries_never_import_stages_and_stages_not_each_other():
  assert STAGES >= {f"{PKG}.{s}" for s in ("collect", "train", "scores", "evaluate", "unlearn", "pipeline")}
  bad = []
  for m, targets in _graph().items():
    for t in targets & STAGES:
      bad.append(f"{m} imports the stage {t}")
  assert not bad, bad


def test_imports_inside_functions_are_deferred_on_purpose():
  """An import inside a function says why on its line or the line above ('deferred')."""
  bad = []
  for m, path in MODULES.items():
    lines = open(path).read().split("\n")
    for _, node, in_fn in _imports(m, path):
      if in_fn:
        here = " ".join(lines[max(0, node.lineno - 2):node.end_lineno])
        if "deferred" not in here.lower():
          bad.append(f"{path}:{node.lineno}")
  assert not bad, sorted(set(bad))


def test_one_module_imports_diffusers_and_transformers():
  users = sorted({m for m, path in MODULES.items() for t, _, _ in _imports(m, path)
                  if t.split(".")[0] in ("diffusers", "transformers")})
  assert users == [HF_MODULE]


def test_modules_stay_under_500_lines():
  long = {m: n for m, path in MODULES.items() if (n := sum(1 for _ in open(path))) > 500}
  assert not long, long


def test_every_registered_stage_runs_and_every_pipeline_step_has_its_call():
  import importlib
  for st in registry.STAGES.values():
    assert st.module in MODULES, st.module
    assert "def run(" in open(MODULES[st.module]).read(), st.module
  for step in registry.PIPELINE:
    module = importlib.import_module(registry.STAGES[step.stage].module)
    assert callable(getattr(module, "pipeline_step", None)), step
    assert set(step.upstream) <= set(registry.PIPELINE_STEPS)


def test_architecture_doc_maps_every_module():
  """docs/architecture.md's module map names each module of the package, and only those."""
  text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
  mapped = set(re.findall(r"`(saemnesia_jax/[\w/]+\.py)`", text))
  actual = {os.path.relpath(p, ROOT) for p in MODULES.values()}
  assert mapped == actual, (sorted(actual - mapped), sorted(mapped - actual))


@pytest.mark.parametrize("module", ["saemnesia_jax.runtime.cli", "saemnesia_jax.runtime.checks",
                                    "saemnesia_jax.runtime.layout", "saemnesia_jax.runtime.registry"])
def test_the_command_line_layer_loads_no_jax(module):
  """Help, checks and paths run before JAX loads: a bad value costs a second, not a model load."""
  import subprocess
  import sys
  code = f"import sys, {module}; print(sorted(m for m in ('jax', 'tensorstore', 'diffusers', 'torch') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == "[]", out
