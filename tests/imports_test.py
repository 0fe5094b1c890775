"""The package's import graph: acyclic, every import at module level, every module small."""

import ast
import importlib.metadata
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"lamini_jax": ROOT / "lamini_jax", "lamini_jax_kernels": ROOT / "kernels"}
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for both installed packages."""
  out = {}
  for package, root in PACKAGES.items():
    for path in sorted(root.rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join((package,) + parts)] = path
  return out


MODULES = _modules()


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
  """The project modules an import statement loads (a name imported from a module counts as the module)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in MODULES]
  base = node.module or ""
  if node.level:
    package = module.split(".")
    if MODULES[module].name != "__init__.py":
      package = package[:-1]
    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
  found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
  return found or ([base] if base in MODULES else [])


def _graph() -> tuple[dict[str, set[str]], list[str]]:
  """(module -> project modules it imports, imports found inside functions or classes)."""
  graph, nested = {}, []
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for stmt in tree.body:  # module-level try/if blocks (optional dependencies) count as top level
      if isinstance(stmt, (ast.Try, ast.If)):
        top |= {id(n) for n in ast.walk(stmt)}
    graph[module] = set()
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      if id(node) not in top:
        nested.append(f"{path.relative_to(ROOT)}:{node.lineno}")
      graph[module] |= set(_imported(module, node)) - {module}
  return graph, nested


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle, as a list of modules, or None."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state and (found := visit(n)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  graph, _ = _graph()
  assert len(graph) > 30  # every module was found
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_every_import_is_at_module_level():
  _, nested = _graph()
  assert not nested, f"imports inside functions: {nested}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("lamini_jax.")))
def test_module_is_small(module):
  lines = len(MODULES[module].read_text().splitlines())
  assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it by concept"


def test_installed_names_are_the_project_s_own():
  # `kernels`, `experiments` and `benchmarks` are generic names other distributions use (Hugging
  # Face's hub-kernels library installs `kernels`): the library ships its kernels as
  # `lamini_jax_kernels`, and the import system finds them there.
  spec = importlib.util.find_spec("lamini_jax_kernels.gather_apply")
  assert spec is not None
  assert pathlib.Path(spec.origin).read_text() == (ROOT / "kernels" / "gather_apply.py").read_text()
  owners = importlib.metadata.packages_distributions()
  for generic in ("kernels", "experiments", "benchmarks"):  # from the checkout (cwd), another
    found = importlib.util.find_spec(generic)                # distribution's, or not at all
    assert not {"lamini-jax", "lamini_jax"} & set(owners.get(generic, ())), owners.get(generic)
    if found is None or owners.get(generic):
      continue
    assert pathlib.Path(found.submodule_search_locations[0]).resolve().parent == ROOT, found


def test_running_from_the_checkout_leaves_the_name_kernels_to_its_distribution():
  """A command run from the checkout has the checkout on sys.path, where the folder `kernels/`
  would answer to Hugging Face's `kernels` (a dependency of transformers 5.x) and break
  `import transformers.activations`; `kernels/__init__.py` hands the name over."""
  code = ("import importlib.metadata, kernels, transformers.activations\n"
          "try:\n  importlib.metadata.version('kernels'); print('installed', kernels.__file__)\n"
          "except importlib.metadata.PackageNotFoundError:\n  print('absent', kernels.__file__)\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  state, origin = done.stdout.split()
  inside = ROOT in pathlib.Path(origin).resolve().parents
  assert inside == (state == "absent"), done.stdout


@pytest.mark.slow
def test_wheel_installs_only_the_library(tmp_path):
  """`pip install .` would put exactly these top-level names into site-packages."""
  source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "lamini_jax", "kernels", "experiments", "benchmarks"):
    copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
    copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path)
  (wheel,) = tmp_path.glob("lamini_jax-*.whl")
  names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
  top = {n for n in names if not n.endswith(".dist-info")}
  assert top == {"lamini_jax", "lamini_jax_kernels"}, names
  files = set(zipfile.ZipFile(wheel).namelist())
  for module in MODULES.values():  # every module of both packages is in the wheel
    rel = module.relative_to(ROOT)
    name = pathlib.Path("lamini_jax_kernels", *rel.parts[1:]) if rel.parts[0] == "kernels" else rel
    assert str(name) in files, name
