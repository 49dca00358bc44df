"""Installs one image's pinned dependencies into a virtual environment.

Runs in ``containers/Dockerfile`` (``--image`` is its build arg ``IMAGE``). What each
image installs is ``IMAGES`` below: extras of the project's ``pyproject.toml`` (so an
image and ``pip install .[extra]`` cannot drift apart) and a few more requirements,
pinned by ``requirements/constraints.txt``. The trainer's JAX build follows
``--accelerator`` (``JAX_EXTRAS``), with the pins of
``requirements/constraints-ACCELERATOR.txt`` (``containers/trainer/`` in the source tree).

``tensorflow_cpu`` installs ``tensorflow-cpu`` (the CPU-only build of the same
release: no CUDA kernels, about a third of the size) where the extras ask for
``tensorflow``. tensorflow-transform and tfx-bsl require the distribution named
``tensorflow``, so a metadata-only ``tensorflow`` distribution of the pinned version,
requiring ``tensorflow-cpu`` of that version, is written first; ``pip check`` accepts it.

An image built for the CPU must hold no NVIDIA or jax-cuda package: the install fails
when one is found.

Usage (only the standard library is needed):
  python3 install_deps.py --image trainer --accelerator cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
# Distributions that mean CUDA (never in an image built for the CPU).
CUDA_PREFIXES = ("nvidia-", "jax-cuda", "cupy")


@dataclasses.dataclass(frozen=True)
class Image:
  """What one image installs on top of the project's own dependencies."""
  extras: tuple[str, ...]
  also: tuple[str, ...] = ()
  tensorflow_cpu: bool = False
  accelerated: bool = False  # takes jax[JAX_EXTRAS[accelerator]] and its pins


# The images of components/images.py (tests/infra checks the names agree).
IMAGES = {
    "preprocess": Image(extras=("preprocess",), also=("kfp",), tensorflow_cpu=True),
    "trainer": Image(extras=("train",), also=("kfp",), tensorflow_cpu=True, accelerated=True),
    "tools": Image(extras=("pipelines",)),
    "serving": Image(extras=("serve",), also=("jax[cpu]",)),
}
# ACCELERATOR -> the jax extra that brings its runtime.
JAX_EXTRAS = {"cpu": "cpu", "cuda": "cuda12", "tpu": "tpu"}


def plan(image: str, accelerator: str = "cpu") -> tuple[Image, list[str], list[str]]:
  """``(IMAGES[image], more requirements, more constraint files)`` for an accelerator."""
  if image not in IMAGES:
    raise SystemExit(f"install_deps: unknown image {image!r}; expected one of {sorted(IMAGES)}")
  if accelerator not in JAX_EXTRAS:
    raise SystemExit(f"install_deps: ACCELERATOR must be one of {sorted(JAX_EXTRAS)}, "
                     f"not {accelerator!r}")
  spec = IMAGES[image]
  if not spec.accelerated:
    if accelerator != "cpu":
      accelerated = [n for n, i in IMAGES.items() if i.accelerated]
      raise SystemExit(f"install_deps: the {image} image is CPU-only; ACCELERATOR="
                       f"{accelerator} applies to {accelerated} only")
    return spec, list(spec.also), []
  return (spec, [*spec.also, f"jax[{JAX_EXTRAS[accelerator]}]"],
          [f"requirements/constraints-{accelerator}.txt"])


def cuda_packages(names: list[str]) -> list[str]:
  """The names among ``names`` (distributions) that are CUDA packages."""
  return sorted(n for n in names if n.lower().replace("_", "-").startswith(CUDA_PREFIXES))


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
  parser.add_argument("--image", required=True, help=f"one of {sorted(IMAGES)}")
  parser.add_argument("--accelerator", default="cpu", help=f"one of {sorted(JAX_EXTRAS)}")
  parser.add_argument("--venv", default="/opt/venv")
  parser.add_argument("--project", default=".", help="folder with pyproject.toml")
  parser.add_argument("--constraints", default="requirements/constraints.txt")
  args = parser.parse_args()
  spec, also, more_constraints = plan(args.image, args.accelerator)

  venv = pathlib.Path(args.venv)
  if not (venv / "bin" / "python").exists():
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip())

  reqs = requirements(pathlib.Path(args.project) / "pyproject.toml", list(spec.extras), also)
  constraints = []
  for path in [args.constraints, *more_constraints]:
    constraints += ["-c", path]
  pip = [python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"]

  tf_version = pinned_version(reqs, "tensorflow")
  if spec.tensorflow_cpu and tf_version:
    write_tensorflow_shim(site, tf_version)
    subprocess.run(pip + constraints + [f"tensorflow-cpu=={tf_version}"], check=True)

  print(f"install_deps: {args.image} (accelerator {args.accelerator}): installing",
        " ".join(reqs), flush=True)
  subprocess.run(pip + constraints + reqs, check=True)
  freed = strip(site)
  print(f"install_deps: stripped {freed / 1e6:.0f} MB of tests and headers", flush=True)
  subprocess.run([python, "-m", "pip", "check"], check=True)
  if args.accelerator == "cpu":
    installed = json.loads(subprocess.run(
        [python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True).stdout)
    found = cuda_packages([d["name"] for d in installed])
    if found:
      raise SystemExit(f"install_deps: the CPU {args.image} image must not contain CUDA "
                       f"packages: {found}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
