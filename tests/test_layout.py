"""The package's layout rules (docs/architecture.md, "Where things are"):
imports flow one way, from the command lines down to the numerics; no
command line imports another; no module is much over 400 lines."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jmceln_jax", "data_prep", "bench")
COMMANDS = {
  f"jmceln_jax.{name}"
  for name in (
    "train",
    "evaluate",
    "predict",
    "summary",
    "demo",
    "export",
    "convert_clip",
  )
}
# Lowest first; a module may import only modules of its own layer or below.
# The most specific prefix decides.
LAYERS = (
  ("jmceln_jax.typing", "jmceln_jax.config_lib", "jmceln_jax.utils"),
  ("jmceln_jax.ops",),
  ("jmceln_jax.models", "jmceln_jax.data", "data_prep"),
  (
    "jmceln_jax.training.losses",
    "jmceln_jax.training.optim",
    "jmceln_jax.training.sharding",
    "jmceln_jax.training.checkpoints",
    "jmceln_jax.evaluation.metrics",
    "jmceln_jax.evaluation.visualize",
    "jmceln_jax.convert",
  ),
  ("jmceln_jax.training.steps",),
  ("jmceln_jax.training.model_state",),
  (
    "jmceln_jax.training.costs",
    "jmceln_jax.evaluation.scoring",
    "jmceln_jax.serving.inference",
    "jmceln_jax.serving.exported",
  ),
  (
    "jmceln_jax.training.loop",
    "jmceln_jax.evaluation.offline",
    "jmceln_jax.serving",
  ),
  ("jmceln_jax.cli",),
  (*sorted(COMMANDS), "bench"),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The project modules `path` imports (a `from package import module`
  counts as the module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return {m for m in found if m in modules}


def _layer(module: str) -> int:
  best = None
  for k, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (k, len(prefix))
  assert best is not None, f"{module} belongs to no layer of LAYERS"
  return best[0]


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}


def test_imports_flow_one_way():
  graph = _graph()
  upward = [
    f"{a} imports {b}"
    for a, deps in graph.items()
    for b in deps
    if _layer(b) > _layer(a)
  ]
  assert not upward, "\n".join(upward)


def test_no_command_line_imports_another():
  graph = _graph()
  bad = [
    f"{a} imports {b}" for a, deps in graph.items() for b in deps & COMMANDS
  ]
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done.

  def visit(module: str, path: list[str]) -> None:
    state[module] = 1
    for dep in sorted(graph[module]):
      assert state.get(dep) != 1, " -> ".join([*path, module, dep])
      if dep not in state:
        visit(dep, [*path, module])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [])


def test_modules_stay_readable():
  """About 400 lines at most (a little slack, not a second limit)."""
  long = {
    m: n
    for m, p in _modules().items()
    if (n := len(p.read_text().splitlines())) > 420
  }
  assert not long, long
