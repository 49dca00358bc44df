"""Installs one image's pinned dependencies into a virtual environment.

Runs in the builder stage of every Dockerfile under ``containers/``. The packages come
from the project's extras in ``pyproject.toml`` (so an image and ``pip install
.[extra]`` cannot drift apart), pinned by ``requirements/constraints.txt``.

``--tensorflow-cpu`` installs ``tensorflow-cpu`` (the CPU-only build of the same
release: no CUDA kernels, about a third of the size) where the extras ask for
``tensorflow``. tensorflow-transform and tfx-bsl require the distribution named
``tensorflow``, so a metadata-only ``tensorflow`` distribution of the pinned version,
requiring ``tensorflow-cpu`` of that version, is written first; ``pip check`` accepts it.

Usage (inside the builder stage; only the standard library is needed):
  python3 install_deps.py --extras preprocess --also kfp --tensorflow-cpu
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

# Removed from site-packages after installing: test suites and C++ headers that no
# step imports at run time.
STRIP_DIRS = ("tensorflow/include",)
STRIP_DIR_NAMES = ("tests",)
STRIP_FILE_GLOBS = ("*_test.py", "*_test.cpython-*.pyc")


def requirements(pyproject: pathlib.Path, extras: list[str], also: list[str]) -> list[str]:
  project = tomllib.loads(pyproject.read_text())["project"]
  optional = project.get("optional-dependencies", {})
  unknown = [e for e in extras if e not in optional]
  if unknown:
    raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
  reqs = list(project.get("dependencies", []))
  for extra in extras:
    reqs += optional[extra]
  return reqs + also


def pinned_version(reqs: list[str], name: str) -> str | None:
  for req in reqs:
    m = re.fullmatch(rf"\s*{re.escape(name)}\s*==\s*([\w.]+)\s*", req, flags=re.I)
    if m:
      return m.group(1)
  return None


def write_tensorflow_shim(site: pathlib.Path, version: str) -> None:
  """A ``tensorflow`` distribution with no files that requires ``tensorflow-cpu``."""
  info = site / f"tensorflow-{version}.dist-info"
  info.mkdir(parents=True, exist_ok=True)
  (info / "METADATA").write_text(
      "Metadata-Version: 2.1\n"
      "Name: tensorflow\n"
      f"Version: {version}\n"
      "Summary: Stand-in for tensorflow, satisfied by tensorflow-cpu (recml images).\n"
      f"Requires-Dist: tensorflow-cpu=={version}\n")
  (info / "INSTALLER").write_text("recml-install_deps\n")
  (info / "RECORD").write_text(
      "".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))


def strip(site: pathlib.Path) -> int:
  """Deletes what ``STRIP_*`` names; returns the bytes freed."""
  victims: list[pathlib.Path] = [site / d for d in STRIP_DIRS if (site / d).exists()]
  for name in STRIP_DIR_NAMES:
    victims += [p for p in site.glob(f"*/**/{name}") if p.is_dir()]
  for pattern in STRIP_FILE_GLOBS:
    victims += [p for p in site.rglob(pattern) if p.is_file()]
  freed = 0
  for path in victims:
    if not path.exists():  # inside a directory removed before
      continue
    if path.is_dir():
      freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
      shutil.rmtree(path)
    else:
      freed += path.stat().st_size
      path.unlink()
  return freed


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--venv", default="/opt/venv")
  parser.add_argument("--project", default=".", help="folder with pyproject.toml")
  parser.add_argument("--constraints", default="requirements/constraints.txt")
  parser.add_argument("--constraint", action="append", default=[],
                      help="an additional constraints file (e.g. accelerator pins)")
  parser.add_argument("--extras", default="", help="comma-separated extras of the project")
  parser.add_argument("--also", nargs="*", default=[], help="more requirements, e.g. kfp")
  parser.add_argument("--tensorflow-cpu", action="store_true")
  args = parser.parse_args()

  venv = pathlib.Path(args.venv)
  if not (venv / "bin" / "python").exists():
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip())

  extras = [e for e in args.extras.split(",") if e]
  reqs = requirements(pathlib.Path(args.project) / "pyproject.toml", extras, args.also)
  constraints = ["-c", args.constraints]
  for extra_file in args.constraint:
    constraints += ["-c", extra_file]
  pip = [python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"]

  tf_version = pinned_version(reqs, "tensorflow")
  if args.tensorflow_cpu and tf_version:
    write_tensorflow_shim(site, tf_version)
    subprocess.run(pip + constraints + [f"tensorflow-cpu=={tf_version}"], check=True)

  print("install_deps: installing", " ".join(reqs), flush=True)
  subprocess.run(pip + constraints + reqs, check=True)
  freed = strip(site)
  print(f"install_deps: stripped {freed / 1e6:.0f} MB of tests and headers", flush=True)
  subprocess.run([python, "-m", "pip", "check"], check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
