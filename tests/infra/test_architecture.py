"""The layering of the packages (CONTRIBUTING.md): `trainers/` is a library that works
without any pipeline machinery, so it never imports `components`, `pipelines`, `serving`
or `kfp`; `serving/` (the model server) builds on `trainers` only, never on `components`,
`pipelines` or `kfp` (the serving image has no KFP); `components/` never imports
`pipelines`. Checked on the source with `ast`: every import,
at module level or inside a function, relative imports resolved, and
importlib.import_module / __import__ calls with a literal name."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "trainers": {"components", "pipelines", "serving", "kfp"},
    "serving": {"components", "pipelines", "kfp"},
    "components": {"pipelines"},
}


def _imports(path: pathlib.Path, root: pathlib.Path) -> list[tuple[int, str]]:
  """(line, absolute module name) of every import in ``path``, in line order."""
  tree = ast.parse(path.read_text(), filename=str(path))
  # The package a relative import starts from: trainers/models/x.py -> [trainers, models]
  # (also for trainers/models/__init__.py).
  package = list(path.relative_to(root).parts[:-1])
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[:len(package) - node.level + 1] if node.level <= len(package) else []
        prefix = ".".join(base)
        module = ".".join(p for p in (prefix, node.module or "") if p)
        if not node.module:  # from .. import x: x may be a module
          found += [(node.lineno, f"{module}.{a.name}" if module else a.name)
                    for a in node.names]
          continue
      else:
        module = node.module or ""
      found.append((node.lineno, module))
    elif isinstance(node, ast.Call) and node.args:
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      arg = node.args[0]
      if (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
          and isinstance(arg.value, str)):
        found.append((node.lineno, arg.value))
  return sorted(found)


def _violations(package: str, root: pathlib.Path = ROOT) -> list[str]:
  forbidden = FORBIDDEN[package]
  bad = []
  for path in sorted((root / package).rglob("*.py")):
    for line, module in _imports(path, root):
      if module.split(".")[0] in forbidden:
        bad.append(f"{path.relative_to(root)}:{line}: imports {module}")
  return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
  assert list((ROOT / package).rglob("*.py")), f"no source found under {package}/"
  bad = _violations(package)
  assert not bad, (f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n  "
                   + "\n  ".join(bad))


def test_the_checker_sees_every_kind_of_import(tmp_path):
  """The checker itself: top-level, in-function, relative and dynamic imports are found."""
  pkg = tmp_path / "trainers" / "sub"
  pkg.mkdir(parents=True)
  (pkg / "m.py").write_text(
      "import os\n"
      "import kfp.dsl\n"
      "def f():\n"
      "  from pipelines import cli\n"
      "  import importlib\n"
      "  importlib.import_module('components.train')\n"
      "from ... import components\n"
      "from . import sibling\n")
  bad = _violations("trainers", tmp_path)
  assert [b.split(": ")[0] for b in bad] == [f"trainers/sub/m.py:{n}" for n in (2, 4, 6, 7)], bad


def test_the_checker_knows_the_serving_layer(tmp_path):
  """serving may import trainers, not components or pipelines; trainers never serving."""
  for package, source in (("trainers", "import numpy\nfrom serving import registry\n"),
                          ("serving", "from trainers import export\nfrom . import protocol\n"
                                      "import components.deploy\nfrom pipelines import env\n")):
    (tmp_path / package).mkdir()
    (tmp_path / package / "m.py").write_text(source)
  assert _violations("trainers", tmp_path) == ["trainers/m.py:2: imports serving"]
  assert _violations("serving", tmp_path) == ["serving/m.py:3: imports components.deploy",
                                              "serving/m.py:4: imports pipelines"]
