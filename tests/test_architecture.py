"""The code's shape, checked: data flows one way (no import cycles, models free of the data
pipeline, libraries free of entry points and flags), imports at the top of each file, and no
module too long to read."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("earthgptx_jax", "data_pipelines", "configs")
# Entry points: thin main()s that parse flags and call the libraries.
ENTRY_POINTS = {"earthgptx_jax.train", "earthgptx_jax.evaluate", "earthgptx_jax.infer",
                "earthgptx_jax.export_torch", "earthgptx_jax.demo", "data_pipelines.build"}
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


MODULES = _modules()


def _imported(name: str, node: ast.AST) -> list[str]:
  """Project modules an import statement names (`from a import b` may import module a.b)."""
  if isinstance(node, ast.Import):
    targets = [alias.name for alias in node.names]
  else:  # the project imports absolutely (no relative imports)
    base = node.module or ""
    targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
  return [t for t in targets if t in MODULES]


def _graph(top_level_only: bool) -> dict[str, set[str]]:
  graph = {}
  for name, path in MODULES.items():
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    graph[name] = {t for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))
                   for t in _imported(name, node) if t != name}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_import_graph_has_no_cycle():
  # Function-local imports included: moving an import into a function hides a cycle, it does
  # not remove it.
  assert _cycle(_graph(top_level_only=False)) is None, " -> ".join(
      _cycle(_graph(top_level_only=False)))


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_models_do_not_import_the_data_pipeline():
  graph = _graph(top_level_only=False)
  offenders = {m: sorted(t for t in graph[m] if t.startswith("data_pipelines"))
               for m in graph if m.startswith("earthgptx_jax.models")}
  assert not {m: t for m, t in offenders.items() if t}


def test_libraries_import_no_entry_point_and_define_no_flags():
  graph = _graph(top_level_only=False)
  for name, path in MODULES.items():
    if name in ENTRY_POINTS:
      continue
    assert not graph[name] & ENTRY_POINTS, f"{name} imports {graph[name] & ENTRY_POINTS}"
    assert "flags.DEFINE" not in path.read_text(), f"{name} defines flags"


def _local_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """Imports inside functions or classes without a comment (same line or the line above)
  saying why they are there."""
  lines = path.read_text().splitlines()
  tree = ast.parse("\n".join(lines))
  found = []
  for scope in ast.walk(tree):
    if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      continue
    for node in ast.walk(scope):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
        if "#" not in line and not above.startswith("#"):
          found.append((node.lineno, line.strip()))
  return sorted(set(found))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_are_at_the_top_unless_a_comment_says_why(name):
  found = _local_imports(MODULES[name])
  assert not found, "\n".join(f"{MODULES[name]}:{line}: {text}" for line, text in found)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_too_long_to_read(name):
  lines = len(MODULES[name].read_text().splitlines())
  assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines; split it by concept"
